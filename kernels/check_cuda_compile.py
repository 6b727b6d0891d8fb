"""Compile-check the CUDA sources with nvcc, also on machines without a GPU or a CUDA torch.

    python kernels/check_cuda_compile.py                 # every kernels/csrc/cuda/*.cu, sm_80 + sm_90
    python kernels/check_cuda_compile.py a.cu --arch 90  # chosen files / archs

torch's CUDAExtension refuses to build against a CPU-only torch, so CI cannot link the CUDA
kernels there; it can still compile them. Each .cu is compiled with `nvcc -c` against the
installed torch's headers and the flags torch's own extension builds use, for the Ampere
(sm_80) and Hopper (sm_90) GPUs we train on. A syntax or type error exits non-zero.

Exit status: 0 all compiled, 1 a file failed, 2 nvcc not found.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = ("80", "90")


def build_nvcc_command(source: str, output: str, archs=DEFAULT_ARCHS, nvcc: str = "nvcc") -> list[str]:
    """The nvcc command line that compiles `source` to the object `output`.

    Args:
        source: path of a .cu file.
        output: path of the object file to write.
        archs: compute capabilities without the dot ("80", "90").
        nvcc: the nvcc executable.

    Returns:
        The argument list for subprocess.
    """
    import torch
    from torch.utils import cpp_extension

    cmd = [nvcc, "-c", source, "-o", output, "-O3", "-std=c++20", "-Xcompiler", "-fPIC"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)
    cmd += [
        # A CPU torch ships no cmake-generated CUDA config header; the macro makes c10 skip it.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_EXTENSION_NAME=_C",
        # 3189: nvcc's warning about `module` used as an identifier in torch headers (C++20).
        "-diag-suppress",
        "3189",
        # Two archs compile in parallel; CI machines have 2 cores.
        "--threads",
        "2",
    ]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return cmd


def check_files(sources, archs=DEFAULT_ARCHS, nvcc: str | None = None, verbose: bool = True) -> list[str]:
    """Compile each source; returns the ones that failed (empty list: all compiled).

    Raises:
        FileNotFoundError: nvcc is not on PATH (and none was given).
    """
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH; install the CUDA toolkit or skip the CUDA compile check")
    failed = []
    with tempfile.TemporaryDirectory(prefix="megadual-nvcc-") as tmp:
        for src in sources:
            out = os.path.join(tmp, os.path.basename(src) + ".o")
            start = time.perf_counter()
            proc = subprocess.run(build_nvcc_command(src, out, archs, nvcc), capture_output=True, text=True)
            took = time.perf_counter() - start
            if proc.returncode != 0:
                failed.append(src)
                if verbose:
                    print(f"FAIL {src} ({took:.0f} s)\n{proc.stdout}{proc.stderr}", file=sys.stderr)
            elif verbose:
                print(f"ok   {src} (sm_{', sm_'.join(archs)}; {took:.0f} s)")
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", help="the .cu files (default: kernels/csrc/cuda/*.cu)")
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities, e.g. 80 90")
    args = parser.parse_args(argv)
    sources = args.sources or sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    if not sources:
        print("no .cu sources found", file=sys.stderr)
        return 1
    try:
        failed = check_files(sources, tuple(args.arch))
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
