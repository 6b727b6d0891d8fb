#!/usr/bin/env python3
"""Token extraction throughput: `megadual extract` images/s against the tokenizer's bare encode.

Legend: B batch, S image side, T visual positions, R residual depth.

    .venv/bin/python benchmarks/extract.py                        # debug tokenizer, 1 thread, 1 worker
    .venv/bin/python benchmarks/extract.py --num 2048 --workers 2 --batch-size 64

In one run: builds a random tokenizer from --config (default configs/debug/tokenizer.yaml),
writes --num synthetic images as webdataset shards, then measures

  * bare encode: `tokenizer.encode` on already decoded [B, 3, S, S] batches (the ceiling);
  * extraction: the whole tool (index, decode in --workers DataLoader workers, text ids,
    encode, token shard writes, manifest) on the same images and batch size.

The target is extraction >= 0.9x bare encode: decoding overlaps the forward, so the forward is
the bottleneck. Intra-op threads are --threads (default 1); timings swing on a shared machine,
compare the rows of one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadual.config import load_config  # noqa: E402
from megadual.data.images import RecordDataset, index_shards  # noqa: E402
from megadual.data.synthetic_images import write_synthetic_shards  # noqa: E402
from megadual.models.vision.tokenizer import DualTokenizer  # noqa: E402
from megadual.pipeline.extract import ExtractOptions, extract_tokens  # noqa: E402

TARGET = 0.9
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "debug",
                              "tokenizer.yaml")


def bare_encode(tokenizer: DualTokenizer, images: torch.Tensor, batch_size: int, repeats: int) -> float:
    """images/s of encode alone on pre-decoded images (best of `repeats` passes)."""
    tokenizer.encode(images[:batch_size])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for b in range(0, len(images), batch_size):
            tokenizer.encode(images[b:b + batch_size])
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def extraction(raw: str, tok_dir: str, work: str, batch_size: int, workers: int, repeats: int) -> float:
    """images/s of the full tool, fresh output directory each pass (best of `repeats`)."""
    best = float("inf")
    num = 0
    for r in range(repeats):
        opts = ExtractOptions(inputs=[raw], out=os.path.join(work, f"out-{r}"), tokenizer=tok_dir,
                              batch_size=batch_size, num_workers=workers, show_progress=False)
        start = time.perf_counter()
        num = extract_tokens(opts).num_samples
        best = min(best, time.perf_counter() - start)
    return num / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="a config with a tokenizer section")
    p.add_argument("--num", type=int, default=1024, help="synthetic images (default 1024)")
    p.add_argument("--source-size", type=int, default=48, help="side of the stored PNGs (resized to the tokenizer's)")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="DataLoader decode workers (default 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the main process (default 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as work:
        cfg = load_config(args.config)
        tok_dir = os.path.join(work, "tokenizer")
        DualTokenizer(cfg.tokenizer, seed=0).save_pretrained(tok_dir)
        tokenizer = DualTokenizer.from_pretrained(tok_dir).to(args.device).eval()
        raw = os.path.join(work, "raw")
        write_synthetic_shards(raw, args.num, args.source_size, shard_size=args.shard_size)
        dataset = RecordDataset(index_shards([raw]), tokenizer.image_size)
        images = torch.stack([dataset[i].image for i in range(len(dataset))]).to(args.device)

        encode_ips = bare_encode(tokenizer, images, args.batch_size, args.repeats)
        extract_ips = extraction(raw, tok_dir, work, args.batch_size, args.workers, args.repeats)
        # Bare encode once more after: a drift on the shared machine shows as two differing rows.
        encode_after = bare_encode(tokenizer, images, args.batch_size, args.repeats)

    base = max(encode_ips, encode_after)
    ratio = extract_ips / base
    print(f"\nextraction vs bare encode: {args.num} images {args.source_size}px -> {tokenizer.image_size}px, "
          f"batch {args.batch_size}, {args.workers} decode worker(s), {args.threads} thread(s), device {args.device}")
    print(f"{'measurement':<34}{'images/s':>12}{'vs encode':>12}")
    print(f"{'bare encode (before)':<34}{encode_ips:>12.1f}{encode_ips / base:>11.2f}x")
    print(f"{'bare encode (after)':<34}{encode_after:>12.1f}{encode_after / base:>11.2f}x")
    print(f"{'extraction (end to end)':<34}{extract_ips:>12.1f}{ratio:>11.2f}x")
    print(f"target >= {TARGET:.1f}x: {'met' if ratio >= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
