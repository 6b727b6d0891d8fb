"""Make the CUDA-only torchvision wheel importable next to a CPU torch.

The only torchvision built for torch 2.13.0 is a CUDA build. On a CPU torch its import
fails with "operator torchvision::nms does not exist", and because transformers and lpips
import torchvision when it is installed, so do theirs. Declaring the two missing operator
schemas first lets the import succeed (the models work; torchvision.ops.nms stays
unusable, which MegaDual never calls). Needed once per process, before those imports.
"""

from __future__ import annotations

_applied = False


def patch_torchvision_for_cpu_torch() -> None:
    """Declare torchvision's nms/qnms schemas if torchvision's own kernels cannot (idempotent)."""
    global _applied
    if _applied:
        return
    _applied = True
    import torch

    if torch.version.cuda is not None:
        return  # a CUDA torch loads torchvision's real kernels
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return  # already declared (a working torchvision, or an earlier patch)
    except RuntimeError:
        pass
    # Kept alive at module level: a Library's definitions vanish when it is garbage-collected.
    global _LIBRARY
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
