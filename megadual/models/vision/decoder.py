"""VQGAN-style convolutional pixel decoder: token grid -> image.

Shapes: B batch, C input channels (the tower's hidden size), g token grid side, L latent
side (config `latent_size`), H = W = L * 2^(levels - 1) image side.

The g x g grid of (quantized) pixel features is resized bilinearly to L x L first, because
ViT grids are often not powers of two (27 at 384 px / patch 14) while the decoder doubles its
resolution per level (24 -> 384 in four steps). Then: conv in, a middle of res + attention +
res blocks, per level (deepest first) `num_res_blocks + 1` res blocks with attention where the
resolution is in `attn_resolutions`, nearest 2x upsampling between levels, GroupNorm + SiLU +
conv out to RGB. The output is unbounded; training compares it with images in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megadual.config.schema import PixelDecoderConfig


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1 projected when channels change) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H x W positions, residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # each [B, HW, C]
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PixelDecoder(nn.Module):
    """Decode a grid of pixel features into an image.

    Args:
        in_channels: C, channels of the feature grid.
        cfg: sizes (latent side, channels per level, res blocks, attention resolutions).
        out_channels: 3 for RGB.
    """

    def __init__(self, in_channels: int, cfg: PixelDecoderConfig, out_channels: int = 3):
        super().__init__()
        self.latent_size = cfg.latent_size
        groups = cfg.num_groups
        chans = [cfg.channels * m for m in cfg.ch_mult]
        ch = chans[-1]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(ch, ch, groups), AttnBlock(ch, groups), ResBlock(ch, ch, groups))
        res = cfg.latent_size
        levels = []
        for level in reversed(range(len(chans))):
            blocks: list[nn.Module] = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch, chans[level], groups))
                ch = chans[level]
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(ch, groups))
            if level > 0:
                blocks.append(Upsample(ch))
                res *= 2
            levels.append(nn.Sequential(*blocks))
        self.up = nn.Sequential(*levels)
        self.norm_out = nn.GroupNorm(groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.image_size = res

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """Everything but the final conv. Args: z [B, C, g, g]. Returns: [B, ch, H, W]."""
        if z.shape[-1] != self.latent_size or z.shape[-2] != self.latent_size:
            z = F.interpolate(z, size=(self.latent_size, self.latent_size), mode="bilinear", align_corners=False)
        h = self.up(self.mid(self.conv_in(z)))
        return F.silu(self.norm_out(h))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Args: z [B, C, g, g]. Returns: images [B, 3, H, W] (unbounded; targets are in [-1, 1])."""
        return self.conv_out(self.features(z))

    def last_layer_grad(self, features: torch.Tensor, output_grad: torch.Tensor) -> torch.Tensor:
        """Gradient at the final conv's weight of a loss whose gradient at the output is given.

        Args:
            features: [B, ch, H, W], the final conv's input (`features(z)`).
            output_grad: [B, 3, H, W], d loss / d output.

        Returns:
            d loss / d conv_out.weight, shaped like the weight.
        """
        w = self.conv_out.weight
        return torch.nn.grad.conv2d_weight(features.to(output_grad.dtype), w.shape, output_grad, padding=1)
