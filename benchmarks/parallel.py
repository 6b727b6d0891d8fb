"""Throughput and memory of every parallel layout of the debug backbone, launched for real.

Each layout is one `deepspeed` launch of `megadual train-lm` on the debug config (CPU ranks
here, GPUs where present). Reported: tokens/s over the steps after warm-up (global tokens
per step / median step time), the ratio against the single-rank run, and each rank's peak
resident memory.

    python benchmarks/parallel.py [--steps 40] [--warmup 10] [--config configs/debug/lm.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megadual.launch import run_deepspeed  # noqa: E402

LAYOUTS = [
    ("single rank", 1, []),
    ("dp=2, ZeRO-1", 2, ["parallel.zero_stage=1"]),
    ("dp=2, ZeRO-3", 2, ["parallel.zero_stage=3"]),
    ("tp=2", 2, ["parallel.tp=2"]),
    ("tp=2, ZeRO-3", 2, ["parallel.tp=2", "parallel.zero_stage=3"]),
    ("pp=2, ZeRO-1", 2, ["parallel.pp=2", "parallel.zero_stage=1"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/debug/lm.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ranks, overrides in LAYOUTS:
            run_dir = os.path.join(tmp, name.replace(" ", "").replace(",", "_").replace("=", ""))
            sets = [f"run.out_dir={run_dir}", f"train.steps={args.steps}", *overrides]
            cli = ["train-lm", "--config", args.config, *[a for s in sets for a in ("--set", s)]]
            run_deepspeed(ranks, cli, timeout=1200, log_path=run_dir + ".log")
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                records = [json.loads(line) for line in f][args.warmup:]
            step_time = statistics.median(r["step_time"] for r in records)
            rss = []
            for r in range(ranks):
                with open(os.path.join(run_dir, "ranks", f"rank_{r}.json")) as f:
                    rss.append(json.load(f)["peak_rss_mib"])
            rows.append((name, ranks, records[0]["tokens"] / step_time, rss))

    base = rows[0][2]
    print(f"debug backbone ({args.config}), {args.steps} steps, median over steps {args.warmup + 1}..{args.steps}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} per rank")
    print(f"{'layout':<16} {'ranks':>5} {'tokens/s':>10} {'vs single':>10}  peak RSS per rank (MiB)")
    for name, ranks, tps, rss in rows:
        print(f"{name:<16} {ranks:>5} {tps:>10.0f} {tps / base:>10.2f}  {', '.join(f'{m:.0f}' for m in rss)}")


if __name__ == "__main__":
    main()
