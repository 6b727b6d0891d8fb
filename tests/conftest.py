"""Suite-wide settings: one thread per process (2-core machines) and the `gpu` marker."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from megadual._compat import patch_torchvision_for_cpu_torch  # noqa: E402

torch.set_num_threads(1)
# Tests import transformers directly; with the CUDA-only torchvision installed that needs the patch.
patch_torchvision_for_cpu_torch()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
