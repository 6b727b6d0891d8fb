"""The three tokenizer designs (tokenizer.design) trained on the embedded scenes with one budget,
and what their codes keep: reconstruction, codebook use, and how well small probes read each
caption attribute back from the codes.

    python benchmarks/tokenizer_designs.py --out runs/designs            # ~10 min on 2 CPU cores
    python benchmarks/tokenizer_designs.py --out /tmp/d --steps 2 --train-images 64 --held-out 16 --probe-steps 5

Each design trains `megadual train-tokenizer` with configs/demo/tokenizer.yaml (the demo's 32 px
scenes, 8 x 8 codes of depth 2), the same images, steps, seed and starting tower; only
`tokenizer.design` and the codebook sizes it needs differ (tokenflow pairs two codebooks of one
size, so both take the pixel codebook's 512 codes; single uses one codebook of 512). Scored on
held-out scenes (every shape x colour x side combination): PSNR / SSIM of decode(encode(image)),
the fraction of each codebook's codes the held-out images use, and the demo's code probes
(megadual/demo/probe.py: a linear and a conv probe per branch, the best of them) per attribute,
trained on the training images' codes. The baseline is `dualtoken`, the default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo", "tokenizer.yaml")
DESIGNS = {
    "dualtoken": [],
    "tokenflow": ["tokenizer.design=tokenflow", "tokenizer.semantic_quantizer.codebook_size=512"],
    "single": ["tokenizer.design=single", "tokenizer.semantic_quantizer.codebook_size=512"],
}
HELD_OUT_SEED = 1  # the training scenes use seed 0 (as the demo)


def make_data(out: str, train_images: int, held_out: int) -> None:
    from megadual.data.synthetic_images import write_synthetic_shards

    write_synthetic_shards(os.path.join(out, "train"), train_images, size=32, seed=0)
    write_synthetic_shards(os.path.join(out, "held_out"), held_out, size=32, seed=HELD_OUT_SEED, combinations="all")


def train(out: str, design: str, steps: int) -> float:
    """Train one design in its own process (a process group per run); returns the wall time."""
    sets = [f"run.out_dir={os.path.join(out, design)}", f"images.paths=[{os.path.join(out, 'train')}]",
            f"tokenizer_train.steps={steps}", "tokenizer_train.image_every=0", *DESIGNS[design]]
    cmd = [sys.executable, "-m", "megadual", "train-tokenizer", "--config", CONFIG,
           *[a for s in sets for a in ("--set", s)]]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if done.returncode != 0:
        raise SystemExit(f"{design}: train-tokenizer failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - started


def evaluate(out: str, design: str, probe_steps: int, probe_images: int) -> dict:
    import torch

    from megadual.demo.evaluate import load_scene_shards, reconstruction_quality
    from megadual.demo.probe import encode_code_set, probe_codes
    from megadual.models.vision.tokenizer import DualTokenizer

    tok = DualTokenizer.from_pretrained(os.path.join(out, design, "tokenizer"))
    held_out = load_scene_shards(os.path.join(out, "held_out"))
    train_set = load_scene_shards(os.path.join(out, "train"), limit=probe_images)
    quality = reconstruction_quality(tok, held_out.images)
    test_codes = encode_code_set(tok, held_out.images, held_out.labels)
    usage = {}
    for kind, codes in (("pixel", test_codes.pixel), ("semantic", test_codes.semantic)):
        size = tok.codebook(kind).shape[-2]
        usage[kind] = torch.unique(codes).numel() / size
    table = probe_codes(tok, encode_code_set(tok, train_set.images, train_set.labels), test_codes, probe_steps)
    probes = {a: max(cell["best"] for cell in branches.values()) for a, branches in table.items()}
    sizes = {kind: tok.codebook(kind).shape[-2] for kind in ("pixel", "semantic")}
    return {"psnr": quality.psnr, "ssim": quality.ssim, "usage": usage, "probe": probes, "codebooks": sizes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="working directory (data, runs, results.json)")
    p.add_argument("--steps", type=int, default=300, help="tokenizer steps per design (the same budget for each)")
    p.add_argument("--train-images", type=int, default=4096)
    p.add_argument("--held-out", type=int, default=144)
    p.add_argument("--probe-images", type=int, default=2048, help="training images whose codes train the probes")
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    make_data(args.out, args.train_images, args.held_out)
    results = {}
    for design in args.designs:
        seconds = train(args.out, design, args.steps)
        results[design] = {**evaluate(args.out, design, args.probe_steps, args.probe_images), "train_s": seconds}

    print(f"# tokenizer designs, {args.steps} steps each on {args.train_images} training scenes; scored on "
          f"{args.held_out} held-out scenes (probes: best of linear / conv over the branches)")
    print("| design | codebooks (pixel / semantic) | PSNR dB | SSIM | codes used (pixel / semantic) | "
          "probe shape | probe colour | probe side | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for design, r in results.items():
        cb, u, pr = r["codebooks"], r["usage"], r["probe"]
        books = f"{cb['pixel']} / {cb['semantic']}" + (" (one index)" if design == "tokenflow" else
                                                        " (one codebook)" if design == "single" else "")
        print(f"| {design} | {books} | {r['psnr']:.2f} | {r['ssim']:.3f} | {u['pixel']:.0%} / {u['semantic']:.0%} | "
              f"{pr['shape']:.0%} | {pr['colour']:.0%} | {pr['side']:.0%} | {r['train_s']:.0f} |")
    if "dualtoken" in results:
        base = results["dualtoken"]
        for design, r in results.items():
            if design != "dualtoken":
                print(f"{design} vs dualtoken: PSNR {r['psnr'] - base['psnr']:+.2f} dB, probe (mean over attributes) "
                      f"{sum(r['probe'].values()) / 3 - sum(base['probe'].values()) / 3:+.1%}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
