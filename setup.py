"""Build and install MegaDual.

Install torch==2.13.0 first and build with `pip install --no-build-isolation -e .`:
an isolated build environment would fetch the newest torch from the registry (a
multi-GB CUDA build) just to compile the extension against it.

The C++ extension `megadual._C` (kernels/csrc) is built for CPU by default and with
its CUDA kernels where a CUDA toolkit and a CUDA torch are present. Set
MEGADUAL_BUILD_EXT=0 to skip it; `megadual.ops` then falls back to its PyTorch
reference and says so once.
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extension_modules():
    if os.environ.get("MEGADUAL_BUILD_EXT", "1") == "0":
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("kernels", "csrc", "*.cpp")))
    if not cpp_sources:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    # torch's cpp_extension does not add OpenMP: without it at::parallel_for runs on one thread.
    # -g0: setuptools inherits -g from Python's CFLAGS; debug info only slows the compile and bloats the .so.
    cxx_flags = ["-O3", "-g0", "-fopenmp"]
    link_flags = ["-fopenmp"]
    cuda_sources = sorted(glob.glob(os.path.join("kernels", "csrc", "cuda", "*.cu")))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "megadual._C",
            cpp_sources + cuda_sources,
            # No --use_fast_math: flush-to-zero would let CUDA codes drift from the reference's.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "megadual._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    # ninja compiles the CUDA sources in parallel (MAX_JOBS of them); the CPU build stays on the
    # serial distutils path, which needs no ninja. torch falls back to it when ninja is absent.
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=use_cuda)}


ext_modules, cmdclass = _extension_modules()

setup(
    name="megadual",
    version="0.1.0",
    description="Train DualToken-style unified vision-language models at cluster scale",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megadual", "megadual.*"]),
    package_data={"megadual": ["py.typed"]},
    # Ranges that torch 2.13.0 satisfies, so a CPU machine with it installed never pulls a CUDA torch.
    install_requires=[
        "torch>=2.5,<2.14",
        # Pure-Python wheel; its ops are JIT-built only if used, and MegaDual uses none of them.
        "deepspeed>=0.16",
        "transformers>=4.45",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "tqdm>=4.60",
        "webdataset>=0.2.86",
        "matplotlib>=3.7",  # loss curves and codebook-usage plots (Agg backend, headless)
        "wandb>=0.16",  # opt-in experiment tracking, offline by default
        "pillow>=10",
        # LPIPS for the tokenizer; it needs torchvision, which on a CPU machine resolves to the
        # build matching torch 2.13.0 only under constraints-cpu.txt (see the Makefile).
        "lpips>=0.1.4",
        "torchvision",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            # The parity oracle of the RQ kernels (tests/ops, benchmarks/rq.py); needs torch>=2.4 only.
            "vector-quantize-pytorch>=1.32",
            # The reference PSNR / SSIM the tokenizer metrics are checked against.
            "scikit-image>=0.22",
        ],
        # flash-attn compiles against a CUDA torch: install that torch first, then `pip install .[gpu]`.
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["megadual = megadual.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
