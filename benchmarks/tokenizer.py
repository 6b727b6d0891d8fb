"""DualToken tokenizer throughput: images/s of encode, decode and a training step.

Shapes: B images of H x H pixels, T tokens, R residual depth.

    python benchmarks/tokenizer.py                   # CPU: debug config + so400m tower, 1 thread
    python benchmarks/tokenizer.py --threads 2 --skip-so400m
    python benchmarks/tokenizer.py --encode configs/dualtoken-so400m-384.yaml --device cuda --dtype bf16

--encode CONFIG (any device): the tokenizer of CONFIG, random weights, built on --device and
cast to --dtype; `encode` (tower taps + both RQ branches) against transformers' own
`SiglipVisionModel.forward` of the same tower, --encode-batch images per call. Target on an
H200 at so400m-384 in bf16: >= 600 images/s.

Rows, each against a baseline in the same table:
- debug config (configs/debug/tokenizer.yaml, 32 px, 8x8 tokens, batch 16):
  transformers' own `SiglipVisionModel.forward` of the same tower (baseline), our
  `encode` (tower taps + both RQ branches), `decode`, and one step of the real trainer
  (`train_tokenizer`, DeepSpeed engine, one process; generator + discriminator + LPIPS;
  median step time after warm-up, from its metrics.jsonl).
- so400m-size tower (configs/dualtoken-so400m-384.yaml, random weights, 384 px, 27x27
  tokens), forward only, small batch: transformers' forward (baseline) vs our taps + tail.
Times are medians of --repeats runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DEBUG = os.path.join(REPO, "configs", "debug", "tokenizer.yaml")
SO400M = os.path.join(REPO, "configs", "dualtoken-so400m-384.yaml")


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _debug_rows(repeats: int, batch: int, train_steps: int) -> list[tuple[str, float, str]]:
    import torch

    from megadual.config import load_config
    from megadual.data.images import SyntheticDataset
    from megadual.models.vision.tokenizer import DualTokenizer

    cfg = load_config([DEBUG])
    tok = DualTokenizer(cfg.tokenizer, seed=0).eval()
    data = SyntheticDataset(0, batch, cfg.tokenizer.tower.image_size)
    images = torch.stack([data[i].image for i in range(batch)])
    with torch.no_grad():
        hf = _median_s(lambda: tok.tower.model(images), repeats)
        enc = _median_s(lambda: tok.encode(images), repeats)
        codes = tok.encode(images)[0]
        dec = _median_s(lambda: tok.decode(codes), repeats)
    rows = [("debug: HF SiglipVisionModel forward", batch / hf, "baseline"),
            ("debug: encode (taps + pixel & semantic RQ)", batch / enc, f"{hf / enc:.2f}x"),
            ("debug: decode", batch / dec, f"{hf / dec:.2f}x")]

    from megadual.train.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as run_dir:
        # start_step 0: every step includes the discriminator update and the adaptive weight.
        cfg = load_config([DEBUG], [f"run.out_dir={run_dir}", f"tokenizer_train.steps={train_steps}",
                                    f"tokenizer_train.micro_batch_size={batch}", "tokenizer.discriminator.start_step=0",
                                    "tokenizer_train.image_every=0"])
        train_tokenizer(cfg, show_progress=False)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            times = [json.loads(line)["step_time"] for line in f][3:]
    step = statistics.median(times)
    rows.append(("debug: training step (trainer, 1 rank)", batch / step, f"{hf / step:.2f}x"))
    return rows


def _so400m_rows(repeats: int, batch: int) -> list[tuple[str, float, str]]:
    import torch

    from megadual.config import load_config
    from megadual.models.vision.tower import SiglipTower, build_siglip

    cfg = load_config([SO400M]).tokenizer.tower
    model = build_siglip(cfg, seed=0).eval()
    tower = SiglipTower(model, cfg)
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        hf = _median_s(lambda: model(images), repeats)
        ours = _median_s(lambda: tower.tail(tower.taps(images).semantic), repeats)
    return [(f"so400m tower: HF forward (B={batch})", batch / hf, "baseline"),
            (f"so400m tower: taps + tail (B={batch})", batch / ours, f"{hf / ours:.2f}x")]


ENCODE_TARGET = 600.0


def encode_rows(config: str, batch: int, warmup: int, repeats: int, args) -> dict:
    """images/s of `encode` and of the HF tower forward, on --device in --dtype."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import device_name, median_seconds, resolve_device

    from megadual.config import load_config
    from megadual.models.vision.tokenizer import DualTokenizer

    device, dtype, sync = resolve_device(args)
    cfg = load_config([config]).tokenizer
    with torch.device(device):
        tok = DualTokenizer(cfg, seed=0).to(dtype).eval()
    size = cfg.tower.image_size
    images = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device, dtype)
    with torch.no_grad():
        hf = median_seconds(lambda: tok.tower.model(images), warmup, repeats, sync)
        enc = median_seconds(lambda: tok.encode(images), warmup, repeats, sync)
    return {"config": os.path.relpath(os.path.abspath(config), REPO), "device": device_name(device),
            "dtype": args.dtype, "batch": batch, "image_size": size, "hf_forward_images_per_s": batch / hf,
            "encode_images_per_s": batch / enc, "encode_vs_hf_forward": hf / enc}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encode", metavar="CONFIG", help="measure only encode vs the HF tower, on --device")
    parser.add_argument("--encode-batch", type=int, default=16, help="--encode: images per call (default 16)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="--encode only")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="--encode only")
    parser.add_argument("--json", metavar="PATH", help="--encode: also write the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (default 5)")
    parser.add_argument("--batch", type=int, default=16, help="debug-config batch (default 16)")
    parser.add_argument("--train-steps", type=int, default=15, help="trainer steps to time (default 15)")
    parser.add_argument("--so400m-batch", type=int, default=1, help="so400m tower batch (default 1)")
    parser.add_argument("--skip-so400m", action="store_true", help="skip the so400m-size tower rows")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if args.encode:
        from _common import write_json

        result = encode_rows(args.encode, args.encode_batch, 2, args.repeats, args)
        print(f"\nencode, {result['config']} ({result['image_size']} px), {result['dtype']}, {result['device']}, "
              f"batch {result['batch']}, median of {args.repeats}")
        print(f"HF SiglipVisionModel forward: {result['hf_forward_images_per_s']:.1f} images/s (baseline)")
        print(f"encode (taps + pixel & semantic RQ): {result['encode_images_per_s']:.1f} images/s "
              f"({result['encode_vs_hf_forward']:.2f}x the forward); target at so400m-384 bf16 on an H200: "
              f">= {ENCODE_TARGET:.0f}")
        write_json(args.json, result)
        return 0
    rows = _debug_rows(args.repeats, args.batch, args.train_steps)
    if not args.skip_so400m:
        rows += _so400m_rows(max(1, args.repeats // 2), args.so400m_batch)
    print(f"\nDualToken tokenizer on CPU, {args.threads} thread(s); speed vs the baseline row above it (higher is faster)\n")
    print(f"| {'case':<48} | {'images/s':>9} | {'vs baseline':>11} |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 13}|")
    for name, rate, ratio in rows:
        print(f"| {name:<48} | {rate:>9.2f} | {ratio:>11} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
