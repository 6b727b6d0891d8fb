"""What the benchmark scripts share: device/dtype flags, synchronised timing and --json output."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Optional

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# Dense bf16 tensor-core peak of an H100/H200 SXM (NVIDIA's datasheet, without sparsity):
# MFU figures are quoted against it unless --peak-tflops says otherwise.
H100_BF16_PEAK_TFLOPS = 989.0


def add_device_arguments(parser, default_dtype: str = "fp32") -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    parser.add_argument("--dtype", default=default_dtype, choices=sorted(DTYPES),
                        help=f"weights and activations (default {default_dtype})")
    parser.add_argument("--json", metavar="PATH", help="also write the results as one JSON object to PATH")


def device_and_sync(name: str):
    """(torch.device, sync) for a --device name; a clear exit when CUDA is asked for and absent."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    device = torch.device(name)
    return device, torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def resolve_device(args):
    """(torch.device, torch.dtype, sync) for the --device/--dtype flags (see device_and_sync)."""
    import torch

    device, sync = device_and_sync(args.device)
    return device, getattr(torch, DTYPES[args.dtype]), sync


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} thread(s)"


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None]) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` untimed ones, each bracketed by
    sync() so queued GPU work is counted where it was issued."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_json(path: Optional[str], result: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
