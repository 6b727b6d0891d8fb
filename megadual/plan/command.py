"""The `megadual plan` handler: flags -> Cluster -> Plan -> table / JSON / PNG."""

from __future__ import annotations

import argparse
import json
import sys

from megadual.config import config_from_args

from . import Cluster, make_plan
from .report import GIB, draw_plan, format_plan, parse_bytes


def cluster_from_args(args: argparse.Namespace) -> Cluster:
    for flag, value in (("--gpus", args.gpus), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be a positive number of GPUs")
    if args.gpus > args.gpus_per_node and args.gpus % args.gpus_per_node:
        raise ValueError(f"--gpus {args.gpus}: not a whole number of nodes of --gpus-per-node {args.gpus_per_node}")
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu}: must be in (0, 1] (0.45 is a good H100/H200 figure)")
    if args.gpu_tflops <= 0:
        raise ValueError(f"--gpu-tflops {args.gpu_tflops}: must be positive (989 for an H100/H200 in bf16)")
    memory, reserve = parse_bytes(args.gpu_memory), parse_bytes(args.reserve)
    if reserve >= memory:
        raise ValueError(f"--reserve {args.reserve}: must be below --gpu-memory {args.gpu_memory}")
    return Cluster(args.gpus, min(args.gpus_per_node, args.gpus), memory, args.gpu_tflops, args.mfu, reserve)


def main(args: argparse.Namespace) -> int:
    cluster = cluster_from_args(args)
    plan = make_plan(config_from_args(args), cluster, search=args.search, caption_tokens=args.caption_tokens,
                     doc_len=args.doc_len)
    if args.json:
        json.dump(plan.as_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_plan(plan, top=args.top))
    if args.png:
        draw_plan(plan, args.png, top=args.top)
    sys.stdout.flush()
    if not any(e.fits for e in plan.layouts):
        best = min(plan.layouts, key=lambda e: e.memory_per_rank_bytes["total"]) if plan.layouts else None
        if best is None:
            raise ValueError(f"no layout of {cluster.gpus} GPUs can run this config (see the refusals above)")
        need = best.memory_per_rank_bytes["total"] / GIB
        usable = (cluster.gpu_memory_bytes - cluster.reserve_bytes) / GIB
        raise ValueError(f"does not fit: the smallest layout needs {need:.1f} GiB per rank, a GPU offers {usable:.1f} "
                         f"GiB (--gpu-memory less --reserve); {'add GPUs' if args.search else 'try --search'}, "
                         "lower the micro-batch or turn on activation checkpointing")
    return 0
