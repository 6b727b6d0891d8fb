"""Residual VQ: megadual's kernels vs the PyTorch reference, vector-quantize-pytorch, a GEMM floor
and (on any device) a PyTorch GEMM + argmin baseline.

Shapes: N rows, D dim, K codes, R depth.

    python benchmarks/rq.py                # CPU table, both shapes, 2 threads (a few minutes)
    python benchmarks/rq.py --threads 1 --shapes small
    python benchmarks/rq.py --compare argmin --device cuda --shapes dualtoken-gpu

--compare joint (in one process, on --device, --shapes tokenflow / tokenflow-gpu): TokenFlow's
shared-index search, ops.rq_joint_encode, against its PyTorch reference and against the search
as TokenFlow's code writes it (two full N x K distance matrices per depth, added, argmin).

--compare argmin (in one process, on --device; times are medians after a warm-up, each run
synchronised): the baseline is what a PyTorch-only RVQ does, per depth one full N x K distance
GEMM (torch.addmm), argmin, gather and subtract, plus the reference's EMA update (index_add_);
against it the extension's encode and encode + EMA. Target on an H200 at the DualToken shape
(D=32, K=16384, R=8, N=729 x 64 images): >= 5x the baseline.

Each measurement runs in a fresh subprocess, so peak memory is that run's alone: "peak extra"
is the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over
its RSS once inputs exist. Time is the median of --repeats runs after a warm-up (one run and
no warm-up for anything slower than 5 s). The floor is R plain GEMMs (N x D) @ (D x K) into a
preallocated N x K output: the arithmetic of the distance search with none of the search.
All codebooks are shared by the R depths (DualToken's setting).

The extension's CPU search is the fused register-blocked kernel at D <= 256 (AVX-512 or
AVX2+FMA); the "GEMM-tiled search" row forces the older path (MEGADUAL_RQ_CPU_KERNEL=gemm).

Targets (issue 4): encode + EMA <= 1.25x the floor at D=256; >= 4x faster than
vector-quantize-pytorch's train mode; at D=32, K=16384 the fused encode >= 2.5x faster than
the (memory-bound) floor; extra memory far below one N x K fp32 matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    "d256": dict(n=16384, d=256, k=1024, r=8),
    "dualtoken": dict(n=16384, d=32, k=16384, r=8),
    "small": dict(n=2048, d=64, k=1024, r=4),  # a quick smoke run
    "dualtoken-gpu": dict(n=729 * 64, d=32, k=16384, r=8),  # 64 images of 27 x 27 positions
}
# --compare joint: TokenFlow's code dims (semantic 32, pixel 8) under one index of K codes.
JOINT_SHAPES = {
    "tokenflow": dict(n=729 * 4, ds=32, dp=8, k=16384, r=8),  # 4 images: the reference takes seconds on 2 cores
    "tokenflow-gpu": dict(n=729 * 64, ds=32, dp=8, k=16384, r=8),
    "tokenflow-small": dict(n=512, ds=32, dp=8, k=1024, r=4),  # a quick smoke run
}
ARGMIN_TARGET = 5.0
IMPLS = [
    ("floor", "GEMM floor", "-"),
    ("ext_encode", "megadual ext", "encode"),
    ("ext_train", "megadual ext", "encode + EMA"),
    ("ext_encode_gemm", "megadual ext, GEMM-tiled search", "encode"),
    ("ref_encode", "reference", "encode"),
    ("ref_train", "reference", "encode + EMA"),
    ("vqp_eval", "vq-pytorch", "eval"),
    ("vqp_train", "vq-pytorch", "train"),
]
SLOW_S = 5.0


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _build(impl: str, shape: dict):
    """Inputs and a zero-argument callable for one implementation."""
    import torch

    n, d, k, r = shape["n"], shape["d"], shape["k"], shape["r"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    cb = torch.randn(k, d, generator=g)
    decay, eps = 0.99, 1e-5
    if impl == "floor":
        out = torch.empty(n, k)
        cbt = cb.t()

        def run():
            for _ in range(r):
                torch.mm(x, cbt, out=out)

        return run
    if impl == "ext_encode_gemm":
        # The GEMM-tiled search the fused one replaces at D <= 256 (read by the op per call).
        os.environ["MEGADUAL_RQ_CPU_KERNEL"] = "gemm"
    if impl.startswith(("ext", "ref")):
        import megadual.ops as ops
        from megadual.ops import reference

        if impl.startswith("ext"):
            if not ops.extension_available():
                raise RuntimeError("megadual._C is not built")
            encode, update = ops.rq_encode, ops.ema_update_
        else:
            encode, update = reference.rq_encode, reference.ema_update_
        state = (torch.ones(k), cb.clone(), cb.clone())
        train = impl.endswith("train")

        def run():
            codes = encode(x, state[2], r)[0]
            if train:
                update(*state, x, codes, decay, eps)

        return run
    from vector_quantize_pytorch import ResidualVQ

    rvq = ResidualVQ(dim=d, num_quantizers=r, codebook_size=k, shared_codebook=True, kmeans_init=False, decay=decay)
    with torch.no_grad():
        rvq.layers[0]._codebook.embed.copy_(cb[None])
    rvq.train(impl == "vqp_train")
    xb = x[None]

    def run():
        with torch.no_grad():
            rvq(xb)

    return run


def _measure(impl: str, shape_name: str, threads: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    run = _build(impl, SHAPES[shape_name])
    start = time.perf_counter()
    run()  # warm-up (allocator, MKL packing buffers), also tells how slow it is
    first = time.perf_counter() - start
    times, peaks = [], []
    for _ in range(1 if first > SLOW_S else repeats):
        base = _rss_kib("VmRSS")
        resettable = _reset_peak()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        peaks.append((_rss_kib("VmHWM") - base) / 1024 if resettable else float("nan"))
    return {"time_s": statistics.median(times), "peak_mib": max(peaks)}


def _device_with_extension(device_name: str):
    """(device, sync) of --device, after checking that the compiled ops are there to measure."""
    import megadual.ops as ops

    from _common import device_and_sync

    device, sync = device_and_sync(device_name)
    if not ops.extension_available():
        raise SystemExit("megadual._C is not built: run `pip install --no-build-isolation -e .` first")
    return device, sync


def gemm_argmin_encode(x, codebook, depth: int):
    """The baseline search: one full N x K distance matrix per depth and its argmin (||r||^2 is
    the same for every code of a row, so it is left out)."""
    import torch

    residual = x.clone()
    norms = (codebook * codebook).sum(1)
    codes = []
    for _ in range(depth):
        idx = torch.addmm(norms, residual, codebook.t(), alpha=-2).argmin(1)
        residual -= codebook[idx]
        codes.append(idx)
    return torch.stack(codes, 1)


def compare_argmin(shape_name: str, device_name: str, warmup: int, repeats: int) -> dict:
    """Encode and encode + EMA: extension vs the GEMM + argmin baseline, on one device."""
    import torch

    import megadual.ops as ops
    from megadual.ops import reference

    from _common import median_seconds

    device, sync = _device_with_extension(device_name)
    shape = SHAPES[shape_name]
    n, d, k, r = shape["n"], shape["d"], shape["k"], shape["r"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device)
    codebook = torch.randn(k, d, generator=g).to(device)
    state = (torch.ones(k, device=device), codebook.clone(), codebook.clone())

    def base_train():
        reference.ema_update_(*state, x, gemm_argmin_encode(x, state[2], r), 0.99, 1e-5)

    def ext_train():
        ops.ema_update_(*state, x, ops.rq_encode(x, state[2], r).codes, 0.99, 1e-5)

    cases = {
        "baseline_encode": lambda: gemm_argmin_encode(x, codebook, r),
        "baseline_train": base_train,
        "ext_encode": lambda: ops.rq_encode(x, codebook, r),
        "ext_train": ext_train,
    }
    rows = {}
    for name, run in cases.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows[name] = {"time_s": median_seconds(run, warmup, repeats, sync)}
        if device.type == "cuda":
            rows[name]["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    agree = float((ops.rq_encode(x, codebook, r).codes == gemm_argmin_encode(x, codebook, r)).float().mean())
    return {"shape": shape, "device": str(device), "rows": rows, "codes_agree_with_baseline": agree,
            "speedup_encode": rows["baseline_encode"]["time_s"] / rows["ext_encode"]["time_s"],
            "speedup_train": rows["baseline_train"]["time_s"] / rows["ext_train"]["time_s"]}


def print_argmin(result: dict) -> None:
    s = result["shape"]
    print(f"# residual VQ vs GEMM + argmin, shared codebook, fp32, {result['device']}: "
          f"N {s['n']}, D {s['d']}, K {s['k']}, R {s['r']}")
    print("| impl | mode | time ms | vs baseline |")
    print("|---|---|---|---|")
    for impl, mode, key, base in [("GEMM + argmin", "encode", "baseline_encode", "baseline_encode"),
                                  ("GEMM + argmin, reference EMA", "encode + EMA", "baseline_train", "baseline_train"),
                                  ("megadual ext", "encode", "ext_encode", "baseline_encode"),
                                  ("megadual ext", "encode + EMA", "ext_train", "baseline_train")]:
        t, b = result["rows"][key]["time_s"], result["rows"][base]["time_s"]
        print(f"| {impl} | {mode} | {t * 1e3:.2f} | {b / t:.2f}x |")
    print(f"codes equal to the baseline's: {100 * result['codes_agree_with_baseline']:.3f}% "
          "(float ties and summation order may differ)")
    print(f"speed-up, encode + EMA: {result['speedup_train']:.2f}x (target on GPU: >= {ARGMIN_TARGET:.0f}x)")


def two_matrix_joint_encode(x_sem, x_pix, cb_sem, cb_pix, depth: int, weight: float):
    """The shared-index search as TokenFlow's code writes it: per depth a full N x K distance
    matrix for each part, added with the pixel weight, then argmin."""
    import torch

    res_sem, res_pix = x_sem.clone(), x_pix.clone()
    norms_sem, norms_pix = (cb_sem * cb_sem).sum(1), (cb_pix * cb_pix).sum(1)
    codes = []
    for _ in range(depth):
        dist = torch.addmm(norms_sem, res_sem, cb_sem.t(), alpha=-2)
        dist.add_(torch.addmm(norms_pix, res_pix, cb_pix.t(), alpha=-2), alpha=weight)
        idx = dist.argmin(1)
        res_sem -= cb_sem[idx]
        res_pix -= cb_pix[idx]
        codes.append(idx)
    return torch.stack(codes, 1)


def compare_joint(shape_name: str, device_name: str, warmup: int, repeats: int) -> dict:
    """The joint search: extension vs its reference and vs two N x K matrices per depth."""
    import torch

    import megadual.ops as ops
    from megadual.ops import reference

    from _common import median_seconds

    device, sync = _device_with_extension(device_name)
    shape = JOINT_SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    x_sem, x_pix = (torch.randn(shape["n"], shape[d], generator=g).to(device) for d in ("ds", "dp"))
    cb_sem, cb_pix = (torch.randn(shape["k"], shape[d], generator=g).to(device) for d in ("ds", "dp"))
    args = (x_sem, x_pix, cb_sem, cb_pix, shape["r"], 1.0)
    cases = {
        "reference": lambda: reference.rq_joint_encode(*args),
        "two_matrices": lambda: two_matrix_joint_encode(*args),
        "ext": lambda: ops.rq_joint_encode(*args),
    }
    rows = {name: {"time_s": median_seconds(run, warmup, repeats, sync)} for name, run in cases.items()}
    codes = ops.rq_joint_encode(*args).codes
    return {"shape": shape, "device": str(device), "rows": rows,
            "speedup_vs_reference": rows["reference"]["time_s"] / rows["ext"]["time_s"],
            "speedup_vs_two_matrices": rows["two_matrices"]["time_s"] / rows["ext"]["time_s"],
            "codes_equal_reference": bool(torch.equal(codes, reference.rq_joint_encode(*args)[0])),
            "codes_agree_two_matrices": float((codes == two_matrix_joint_encode(*args)).float().mean())}


def print_joint(result: dict) -> None:
    s = result["shape"]
    print(f"# shared-index residual search (TokenFlow), fp32, {result['device']}: N {s['n']}, Ds {s['ds']}, "
          f"Dp {s['dp']}, K {s['k']}, R {s['r']}")
    print("| impl | time ms | vs reference | vs two N x K matrices |")
    print("|---|---|---|---|")
    ref_t, two_t = result["rows"]["reference"]["time_s"], result["rows"]["two_matrices"]["time_s"]
    for key, label in (("reference", "reference (megadual.ops.reference)"), ("two_matrices", "two N x K matrices"),
                       ("ext", "megadual ext")):
        t = result["rows"][key]["time_s"]
        print(f"| {label} | {t * 1e3:.1f} | {ref_t / t:.2f}x | {two_t / t:.2f}x |")
    print(f"codes equal to the reference's: {result['codes_equal_reference']}; to the two-matrix search's: "
          f"{100 * result['codes_agree_two_matrices']:.3f}% (its sums round differently at float ties)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", default="kernels", choices=["kernels", "argmin", "joint"],
                   help="kernels: the CPU table (default); argmin: vs GEMM + argmin on --device; "
                   "joint: the shared-index search vs its reference on --device")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="--compare argmin only")
    p.add_argument("--json", metavar="PATH", help="--compare argmin / joint: also write the results as JSON")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", nargs="+", default=None, choices=sorted({*SHAPES, *JOINT_SHAPES}),
                   help="default: d256 dualtoken (tokenflow with --compare joint)")
    p.add_argument("--impls", nargs="+", default=[i[0] for i in IMPLS], choices=[i[0] for i in IMPLS])
    p.add_argument("--one", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.one:
        print(json.dumps(_measure(args.one[0], args.one[1], args.threads, args.repeats)))
        return 0
    if args.shapes is None:
        args.shapes = ["tokenflow"] if args.compare == "joint" else ["d256", "dualtoken"]
    wrong = [name for name in args.shapes if (name in JOINT_SHAPES) != (args.compare == "joint")]
    if wrong:
        p.error(f"--shapes {' '.join(wrong)}: {'only' if args.compare == 'joint' else 'not'} with --compare joint "
                f"(joint shapes: {', '.join(JOINT_SHAPES)})")
    if args.compare == "joint":
        import torch

        torch.set_num_threads(args.threads)
        from _common import write_json

        results = {name: compare_joint(name, args.device, 1, args.repeats) for name in args.shapes}
        for result in results.values():
            print_joint(result)
        write_json(args.json, results)
        return 0
    if args.compare == "argmin":
        import torch

        torch.set_num_threads(args.threads)
        from _common import write_json

        results = {name: compare_argmin(name, args.device, 1, args.repeats) for name in args.shapes}
        for result in results.values():
            print_argmin(result)
        write_json(args.json, results)
        return 0

    print(f"# residual VQ, shared codebook, fp32, {args.threads} threads (torch.set_num_threads), "
          f"median of {args.repeats} (1 run when > {SLOW_S:.0f} s)")
    print("| N | D | K | R | impl | mode | time s | x GEMM floor | peak extra MiB | N x K fp32 MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        nk_mib = shape["n"] * shape["k"] * 4 / 2**20
        for impl, label, mode in IMPLS:
            if impl not in args.impls:
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
                   "--repeats", str(args.repeats), "--one", impl, shape_name]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                row = f"| {shape['n']} | {shape['d']} | {shape['k']} | {shape['r']} | {label} | {mode}"
                print(f"{row} | failed: {err} | | | |")
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(shape_name, impl)] = res
            floor = results.get((shape_name, "floor"), {}).get("time_s")
            ratio = f"{res['time_s'] / floor:.2f}" if floor else "-"
            print(f"| {shape['n']} | {shape['d']} | {shape['k']} | {shape['r']} | {label} | {mode} | "
                  f"{res['time_s']:.3f} | {ratio} | {res['peak_mib']:.0f} | {nk_mib:.0f} |", flush=True)

    def t(shape_name, impl):
        return results.get((shape_name, impl), {}).get("time_s")

    print()
    for shape_name in args.shapes:
        floor, enc, train, vqp = (t(shape_name, i) for i in ("floor", "ext_encode", "ext_train", "vqp_train"))
        if shape_name == "d256" and floor and train:
            print(f"{shape_name}: encode+EMA / GEMM floor = {train / floor:.2f}  (target: <= 1.25)")
        if shape_name == "dualtoken" and floor and enc:
            print(f"{shape_name}: GEMM floor / encode = {floor / enc:.2f}x  (target: >= 2.5)")
        if vqp and train:
            print(f"{shape_name}: vq-pytorch train / encode+EMA = {vqp / train:.1f}x  (target: >= 4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
