"""Hinge GAN losses and the VQGAN adaptive generator weight.

Shapes: logits [B, 1, h, w] (PatchGAN) or any shape; losses are scalars.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - real)) + mean(relu(1 + fake)), halved
    so that it reads 1.0 for an undecided (all-zero) discriminator."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss of the hinge GAN: -mean(D(fake))."""
    return -fake_logits.float().mean()


def adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, min_weight: float = 0.0,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """VQGAN's balance of the GAN term against the reconstruction term.

    weight = |d nll / d W| / (|d g_loss / d W| + eps), clamped to [min_weight, max_weight], where W
    is the generator's last layer. The caller supplies both gradients at W (how it gets them
    depends on its engine: see megadual.train.tokenizer_loss).

    Args:
        nll_grad: d (weighted reconstruction loss) / d W.
        g_grad: d (generator GAN loss) / d W, same shape.

    Returns:
        [] float32, no grad.
    """
    weight = nll_grad.detach().float().norm() / (g_grad.detach().float().norm() + eps)
    return weight.clamp(min_weight, max_weight)
