#!/usr/bin/env python3
"""Packed multimodal loader: packed tokens/s of one worker (one stream) and the padding fraction.

Legend: T visual positions per image, R residual depth, C tokens per row (seq_len).

    .venv/bin/python benchmarks/loader.py               # default settings, 1 thread
    .venv/bin/python benchmarks/loader.py --samples 4096 --workers 2

Writes random token shards (DualToken shapes: 729 x 8 at 384 px, 256 x 4 at 256 px; captions
of 8-80 ids) to a temporary directory, then reads them back through one loader stream in
this process -- exactly the work one DataLoader worker does -- and reports rows/s,
packed (non-padding) tokens/s and the padding fraction against the 2% target. With
--workers N it also runs the full loader with N DataLoader workers. Timings swing on a
shared machine; compare rows of one run.
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
from megadual.data.shard_writer import TokenShardWriter  # noqa: E402
from megadual.data.token_shards import Manifest, TokenSample  # noqa: E402

TOKENS = SpecialTokens(image_start_id=151652, image_end_id=151653, eos_id=151643, pad_id=151643,
                       generation_marker_id=151654)
CODEBOOK = 16384
TARGET_PADDING = 0.02


def write_tokens(directory: str, num_samples: int, positions: int, depth: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    template = Manifest("0" * 64, "bench", CODEBOOK, CODEBOOK, positions, depth)
    writer = TokenShardWriter(directory, template, samples_per_shard=256)
    for i in range(num_samples):
        writer.add(TokenSample(
            key=f"b{i:07d}", caption="", text_ids=rng.integers(0, 150000, int(rng.integers(8, 81))).astype(np.int32),
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
    return {
        "tokens/s": counts["tokens"] / dt,
        "rows/s": counts["rows"] / dt,
        "padding": counts["padding"] / (counts["tokens"] + counts["padding"]),
    }


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
    parser.add_argument("--samples", type=int, default=2048, help="samples per dataset")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per setting")
    parser.add_argument("--batches", type=int, default=40, help="timed batches of the full loader (--workers)")
    parser.add_argument("--workers", type=int, default=0, help="also run the full loader with N workers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = [  # (name, T, R, seq_len, batch rows)
        ("256px", 256, 4, 2048, 4), ("256px", 256, 4, 4096, 2), ("256px", 256, 4, 8192, 1),
        ("384px", 729, 8, 4096, 2), ("384px", 729, 8, 8192, 1), ("384px", 729, 8, 16384, 1),
    ]
    print(f"packed loader, one stream = one worker, torch threads = {torch.get_num_threads()}, "
          f"{args.samples} samples per dataset, pack_window 1024, captions 8-80 ids")
    header = f"{'images':>7} {'T x R':>8} {'seq_len':>8} {'rows/s':>10} {'tokens/s':>10} {'padding':>8} {'<= 2%':>6}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as root:
        written = {}
        for name, t, r, seq_len, rows in settings:
            if (t, r) not in written:
                written[(t, r)] = os.path.join(root, f"{t}x{r}")
                write_tokens(written[(t, r)], args.samples, t, r)
            cfg = PackedLoaderConfig(paths=[written[(t, r)]], seq_len=seq_len, batch_size=rows, pack_window=1024)
            res = measure(cfg, args.epochs)
            ok = "yes" if res["padding"] <= TARGET_PADDING else "no"
            print(f"{name:>7} {f'{t}x{r}':>8} {seq_len:>8} {res['rows/s']:>10.1f} {res['tokens/s']:>10.0f} "
                  f"{res['padding']:>8.2%} {ok:>6}")
        if args.workers:
            cfg = PackedLoaderConfig(paths=[written[(729, 8)]], seq_len=16384, batch_size=1, pack_window=1024,
                                     num_workers=args.workers, split="sample")
            res = measure_loader(cfg, args.batches)
            print(f"\nfull loader, {args.workers} DataLoader workers, 384px, seq_len 16384: "
                  f"{res['tokens/s']:.0f} packed tokens/s ({res['tokens/s'] / args.workers:.0f} per worker), "
                  f"padding {res['padding']:.2%}")


if __name__ == "__main__":
    main()
