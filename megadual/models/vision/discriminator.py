"""PatchGAN discriminator: one real/fake logit per overlapping image patch.

Shapes: B batch, H = W image side; logits [B, 1, h, w] with h = w ~ H / 2^num_layers.

The pix2pix layout: a stride-2 conv without normalisation, `num_layers - 1` further stride-2
convs doubling the channels (at most 8x), one stride-1 conv, and a 1-channel stride-1 conv.
GroupNorm stands where pix2pix has BatchNorm: BatchNorm's running statistics would differ
between data-parallel ranks and depend on how real and fake images are batched.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch), ch)


class PatchDiscriminator(nn.Module):
    """Args:
    base_channels: channels of the first conv (ndf, 64 in DualToken).
    num_layers: stride-2 convs (3 in DualToken).
    in_channels: 3 for RGB.
    """

    def __init__(self, base_channels: int = 64, num_layers: int = 3, in_channels: int = 3):
        super().__init__()
        if base_channels < 1 or num_layers < 1:
            raise ValueError(
                f"PatchDiscriminator: base_channels and num_layers must be positive, got {base_channels}, {num_layers}"
            )
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for n in range(1, num_layers):
            out = base_channels * min(2**n, 8)
            layers += [nn.Conv2d(ch, out, 4, 2, 1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            ch = out
        out = base_channels * min(2**num_layers, 8)
        layers += [nn.Conv2d(ch, out, 4, 1, 1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(out, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # pix2pix initialisation
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images [B, 3, H, W] in [-1, 1]. Returns: logits [B, 1, h, w]."""
        return self.net(images)
