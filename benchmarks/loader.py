#!/usr/bin/env python3
"""Packed multimodal loader: packed tokens/s of one worker (one stream) and the padding fraction.

Legend: T visual positions per image, R residual depth, C tokens per row (seq_len).

    .venv/bin/python benchmarks/loader.py                      # web-mix captions, default pack_window
    .venv/bin/python benchmarks/loader.py --captions uniform   # the old 8-80 ids
    .venv/bin/python benchmarks/loader.py --only 384 --pack-window 1024 --samples 2048 --workers 2

Writes random token shards (DualToken shapes: 729 x 8 at 384 px, 256 x 4 at 256 px) to a
temporary directory, then reads them back through one loader stream in this process -- exactly
the work one DataLoader worker does -- and reports rows/s, packed (non-padding) tokens/s, the
padding fraction against the 2% target, and the *padding floor*: the padding the same windows
would have with `packing.min_rows` rows, a lower bound for any packer. A padding above the
target but at the floor is a property of the lengths (how many images fit a row), not of the
packer. With --workers N it also runs the full loader with N DataLoader workers.

Caption lengths (text ids per caption; the padding depends on them, the throughput barely):

* web-mix (default): what a unified model is pretrained on is a blend of web alt-text and
  synthetic recaptions, so equal parts of four public caption styles, each log-normal around
  its reported mean (sigma 0.5: right-skewed, as caption lengths are) at 1.3 BPE ids per English
  word. Mean words per caption as listed in the BLIP3-KALE paper (arXiv 2411.07461, Table 1):
  LAION-COCO 8.99, CapsFusion 22.74, Recap-DataComp-1B 49.43, KALE 67.26. Mean about 48 ids.
* uniform: 8-80 ids, uniform (this benchmark's earlier setting; narrow and short).
* detailed: dense GPT-4V-style descriptions only (ShareGPT4V reports 942 characters on
  average: about 210 ids), log-normal with sigma 0.4.

Timings swing on a shared machine; compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadual.config.schema import PackedLoaderConfig  # noqa: E402
from megadual.data.mm_sequence import SpecialTokens  # noqa: E402
from megadual.data.mm_stream import PackedStream  # noqa: E402
from megadual.data.packed_loader import PackedMultimodalLoader, load_shards  # noqa: E402
from megadual.data.packing import min_rows  # noqa: E402
from megadual.data.shard_writer import TokenShardWriter  # noqa: E402
from megadual.data.stream_plan import plan_epoch  # noqa: E402
from megadual.data.token_shards import Manifest, TokenSample  # noqa: E402

TOKENS = SpecialTokens(image_start_id=151652, image_end_id=151653, eos_id=151643, pad_id=151643,
                       generation_marker_id=151654)
CODEBOOK = 16384
TARGET_PADDING = 0.02
IDS_PER_WORD = 1.3
WEB_MIX_WORDS = (8.99, 22.74, 49.43, 67.26)  # LAION-COCO, CapsFusion, Recap-DataComp-1B, KALE
SETTINGS = [  # (name, T, R, seq_len, batch rows)
    ("256px", 256, 4, 2048, 4), ("256px", 256, 4, 4096, 2), ("256px", 256, 4, 8192, 1),
    ("384px", 729, 8, 4096, 2), ("384px", 729, 8, 8192, 1), ("384px", 729, 8, 16384, 1),
]


def caption_lengths(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n caption lengths in text ids (module docstring), each at least 1."""
    if kind == "uniform":
        return rng.integers(8, 81, n)
    if kind == "web-mix":
        means = np.asarray(WEB_MIX_WORDS)[rng.integers(0, len(WEB_MIX_WORDS), n)] * IDS_PER_WORD
        sigma = 0.5
    elif kind == "detailed":
        means, sigma = np.full(n, 942 / 4.5), 0.4  # ~4.5 characters per BPE id of English prose
    else:
        raise ValueError(f"--captions: got {kind!r}, expected web-mix, uniform or detailed")
    # A log-normal with this mean: mu = log(mean) - sigma^2 / 2.
    return np.maximum(1, np.rint(rng.lognormal(np.log(means) - sigma ** 2 / 2, sigma))).astype(np.int64)


def write_tokens(directory: str, num_samples: int, positions: int, depth: int, captions: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    template = Manifest("0" * 64, "bench", CODEBOOK, CODEBOOK, positions, depth)
    writer = TokenShardWriter(directory, template, samples_per_shard=256)
    for i, n in enumerate(caption_lengths(captions, num_samples, rng)):
        writer.add(TokenSample(
            key=f"b{i:07d}", caption="", text_ids=rng.integers(0, 150000, int(n)).astype(np.int32),
            pixel_codes=rng.integers(0, CODEBOOK, (positions, depth)).astype(np.uint16),
            semantic_codes=rng.integers(0, CODEBOOK, (positions, depth)).astype(np.uint16),
            image_size=(384, 384), source_key=f"raw/{i}",
        ))
    writer.close()


def measure(cfg: PackedLoaderConfig, epochs: int) -> dict:
    """One stream in this process (the work of one DataLoader worker), over whole epochs."""
    _, shards = load_shards(cfg.paths)
    it = iter(PackedStream(cfg, TOKENS, shards, stream=0, num_streams=1))
    _, state = next(it)  # open the first shard outside the timing
    first = dict(state["counts"])
    start = time.perf_counter()
    while state["epoch"] < epochs:
        _, state = next(it)
    dt = time.perf_counter() - start
    counts = {k: state["counts"][k] - first[k] for k in ("tokens", "padding", "rows")}
    return {"tokens/s": counts["tokens"] / dt, "rows/s": counts["rows"] / dt}


def padding_and_floor(cfg: PackedLoaderConfig, epochs: int) -> tuple[float, float, int]:
    """(padding fraction, padding floor, samples too long) of the stream's windows over `epochs`.

    Every row of a window is emitted, so the window packings are exactly what the loader
    hands out; the floor packs the same lengths into `min_rows` rows.
    """
    _, shards = load_shards(cfg.paths)
    stream = PackedStream(cfg, TOKENS, shards, stream=0, num_streams=1)
    tokens = rows = floor_rows = 0
    for epoch in range(epochs):
        plan = plan_epoch([s.num_samples for s in shards], cfg.seed, epoch, 0, 1, cfg.split, cfg.mode)
        for window in range(-(-plan.num_samples // cfg.pack_window)):
            packed = stream.window_rows(epoch, window, plan)
            lengths = [len(seq) for row in packed for seq in row]
            tokens += sum(lengths)
            rows += len(packed)
            floor_rows += min_rows(lengths, cfg.seq_len)
    return 1 - tokens / (rows * cfg.seq_len), 1 - tokens / (floor_rows * cfg.seq_len), \
        stream.state["counts"]["dropped_too_long"]


def measure_loader(cfg: PackedLoaderConfig, num_batches: int) -> dict:
    """The full loader with its DataLoader workers (worker start-up outside the timing)."""
    loader = PackedMultimodalLoader(cfg, TOKENS)
    next(loader)
    before = loader.stats
    start = time.perf_counter()
    for _ in range(num_batches):
        next(loader)
    dt = time.perf_counter() - start
    after = loader.stats
    loader.close()
    tokens, padding = after["tokens"] - before["tokens"], after["padding"] - before["padding"]
    return {"tokens/s": tokens / dt, "padding": padding / (tokens + padding)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192, help="samples per dataset (2 windows by default)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per setting")
    parser.add_argument("--captions", default="web-mix", choices=("web-mix", "uniform", "detailed"),
                        help="caption length distribution (module docstring)")
    parser.add_argument("--pack-window", type=int, default=PackedLoaderConfig.pack_window,
                        help="loader.pack_window (default: the config default)")
    parser.add_argument("--only", choices=("256", "384"), help="run only the 256 px or the 384 px settings")
    parser.add_argument("--batches", type=int, default=40, help="timed batches of the full loader (--workers)")
    parser.add_argument("--workers", type=int, default=0, help="also run the full loader with N workers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = [s for s in SETTINGS if args.only is None or s[0] == f"{args.only}px"]
    mean_ids = caption_lengths(args.captions, 100_000, np.random.default_rng(1)).mean()
    print(f"packed loader, one stream = one worker, torch threads = {torch.get_num_threads()}, "
          f"{args.samples} samples per dataset, pack_window {args.pack_window}, "
          f"captions {args.captions} (mean {mean_ids:.0f} ids)")
    header = (f"{'images':>7} {'T x R':>8} {'seq_len':>8} {'rows/s':>10} {'tokens/s':>10} {'padding':>8} "
              f"{'floor':>7} {'<= 2%':>6}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as root:
        written = {}
        for name, t, r, seq_len, rows in settings:
            if (t, r) not in written:
                written[(t, r)] = os.path.join(root, f"{t}x{r}")
                write_tokens(written[(t, r)], args.samples, t, r, args.captions)
            cfg = PackedLoaderConfig(paths=[written[(t, r)]], seq_len=seq_len, batch_size=rows,
                                     pack_window=args.pack_window)
            res = measure(cfg, args.epochs)
            padding, floor, too_long = padding_and_floor(cfg, args.epochs)
            ok = "yes" if padding <= TARGET_PADDING else "no"
            print(f"{name:>7} {f'{t}x{r}':>8} {seq_len:>8} {res['rows/s']:>10.1f} {res['tokens/s']:>10.0f} "
                  f"{padding:>8.2%} {floor:>7.2%} {ok:>6}" + (f"  ({too_long} samples too long)" if too_long else ""))
        if args.workers:
            t, r = (729, 8) if (729, 8) in written else (256, 4)
            cfg = PackedLoaderConfig(paths=[written[(t, r)]], seq_len=16384, batch_size=1,
                                     pack_window=args.pack_window, num_workers=args.workers, split="sample")
            res = measure_loader(cfg, args.batches)
            print(f"\nfull loader, {args.workers} DataLoader workers, T {t}, seq_len 16384: "
                  f"{res['tokens/s']:.0f} packed tokens/s ({res['tokens/s'] / args.workers:.0f} per worker), "
                  f"padding {res['padding']:.2%}")


if __name__ == "__main__":
    main()
