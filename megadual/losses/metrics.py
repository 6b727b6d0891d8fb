"""Reconstruction metrics on images in [-1, 1]: PSNR and SSIM (per image, then averaged).

Shapes: images [B, 3, H, W]; results [] float32 (the batch mean) or [B] with reduce=False.
Both are computed on the [0, 1] scale after clamping, as image-quality papers report them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.detach().float().clamp(-1, 1).add(1).mul(0.5)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB (data range 1 on the [0, 1] scale)."""
    mse = (_unit(reconstruction) - _unit(target)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    value = -10.0 * torch.log10(mse)
    return value.mean() if reduce else value


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(reconstruction: torch.Tensor, target: torch.Tensor, reduce: bool = True, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), Gaussian-weighted, per channel then averaged.

    Matches `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=-1)` on the [0, 1] scale: the
    mean over the valid region (where the window fits). Images smaller than the window use
    the largest odd window that fits.

    Args:
        window: odd window side (11 = skimage's for sigma 1.5: 2 * int(3.5 * sigma + 0.5) + 1).
    """
    x, y = _unit(reconstruction), _unit(target)
    c = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    w = _gaussian_window(size, sigma, c).to(x.device)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    xx = F.conv2d(x * x, w, groups=c) - mu_x**2
    yy = F.conv2d(y * y, w, groups=c) - mu_y**2
    xy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (xx + yy + c2))
    value = s.flatten(1).mean(1)
    return value.mean() if reduce else value
