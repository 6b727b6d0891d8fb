"""Models: the Qwen2 backbone, the DualToken visual tokenizer, heads and the unified model."""

from megadual._compat import patch_torchvision_for_cpu_torch

# transformers (SigLIP, Qwen2 parity) and lpips import torchvision when it is installed.
patch_torchvision_for_cpu_torch()
