"""The CUDA sources compile with nvcc for sm_80 and sm_90 (compile only: no GPU needed).

Skipped only when nvcc is not on PATH. About a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


def _checker():
    path = os.path.join(ROOT, "kernels", "check_cuda_compile.py")
    spec = importlib.util.spec_from_file_location("check_cuda_compile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_sources_compile():
    checker = _checker()
    sources = sorted(
        os.path.join(ROOT, "kernels", "csrc", "cuda", f)
        for f in os.listdir(os.path.join(ROOT, "kernels", "csrc", "cuda"))
        if f.endswith(".cu")
    )
    assert sources, "no CUDA sources found under kernels/csrc/cuda"
    assert checker.check_files(sources) == []


def test_compile_check_fails_on_a_cuda_error(tmp_path):
    # A type error in device code must fail the check (a tiny file: no torch headers, ~2 s).
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k(float* p) { int* q = p; *q = 1; }\n")
    assert _checker().check_files([str(bad)], archs=("80",), verbose=False) == [str(bad)]
