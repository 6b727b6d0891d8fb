"""Semantic distillation: keep (quantized) features close to a frozen teacher's.

Shapes: features [..., C]; cosine is taken over C and averaged over the leading dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_cosine(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the last dim: [] float32."""
    return F.cosine_similarity(features.float(), target.float(), dim=-1).mean()


def semantic_loss(features: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSE + (1 - cos) of `features` against a detached `target`.

    Args:
        features: [..., C] student features (gradients flow).
        target: [..., C] teacher features (treated as constants).

    Returns:
        (loss [], mse [], cosine []) in float32; loss = mse + 1 - cosine.
    """
    target = target.detach()
    mse = F.mse_loss(features.float(), target.float())
    cos = feature_cosine(features, target)
    return mse + (1.0 - cos), mse, cos
