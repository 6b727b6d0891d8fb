"""LPIPS perceptual distance through the `lpips` package, built without any download.

Shapes: images [B, 3, H, W] in [-1, 1] (lpips' own convention); the loss is [] (batch mean).

`lpips` ships only its small linear heads (`lpips/weights/v0.1/{vgg,alex,squeeze}.pth`) and
fetches the backbone from torchvision's model hub. Offline we build the backbone random
(`pnet_rand=True`) and then, when given, load a local torchvision checkpoint into it (e.g.
`vgg16-397923af.pth`, or any state dict with torchvision's `features.*` keys). Without one the
distance is *not* LPIPS (a random-feature distance): the module warns loudly.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

_RANDOM_BACKBONE = (
    "LPIPS is using a RANDOM {net} backbone: no local torchvision checkpoint was given "
    "(tokenizer.loss.lpips_backbone_path). The perceptual loss is then a random-feature distance, "
    "not LPIPS; pass the path of a torchvision {net} checkpoint for real training."
)


def _backbone_key(lpips_name: str) -> str:
    """lpips' `slice3.7.weight` is torchvision's `features.7.weight` (same layer indices)."""
    return re.sub(r"^slice\d+\.", "features.", lpips_name)


def load_backbone_(model: nn.Module, path: str) -> None:
    """Copy a torchvision checkpoint's `features.*` tensors into an lpips.LPIPS backbone.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the checkpoint lacks a backbone tensor or a shape differs.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    backbone = model.net
    own = backbone.state_dict()
    missing = [k for k in own if _backbone_key(k) not in state]
    if missing:
        raise ValueError(
            f"tokenizer.loss.lpips_backbone_path: {path} lacks {len(missing)} backbone tensors, e.g. "
            f"{_backbone_key(missing[0])!r}; expected a torchvision checkpoint of the same network"
        )
    for k, v in own.items():
        src = state[_backbone_key(k)]
        if src.shape != v.shape:
            raise ValueError(f"tokenizer.loss.lpips_backbone_path: {_backbone_key(k)} has shape "
                             f"{list(src.shape)} in {path}, expected {list(v.shape)}")
        v.copy_(src)


class PerceptualLoss(nn.Module):
    """Frozen LPIPS distance (always in eval mode: lpips' heads contain dropout).

    Args:
        net: "vgg" (DualToken's choice), "alex" or "squeeze".
        backbone_path: local torchvision checkpoint of that network; None: random backbone
            with a warning.
    """

    def __init__(self, net: str = "vgg", backbone_path: Optional[str] = None):
        super().__init__()
        from megadual._compat import patch_torchvision_for_cpu_torch

        patch_torchvision_for_cpu_torch()  # lpips imports torchvision
        import lpips

        with warnings.catch_warnings():
            # lpips still passes torchvision's deprecated `pretrained=` argument.
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        self.random_backbone = backbone_path is None
        if backbone_path is None:
            message = _RANDOM_BACKBONE.format(net=net)
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            with torch.no_grad():
                load_backbone_(self.lpips, backbone_path)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance between image batches in [-1, 1]: [] float32."""
        return self.lpips(reconstruction.float(), target.float()).mean()
