"""PNG pictures a person looks at during tokenizer training.

Shapes: images [B, 3, H, W] in [-1, 1]; EMA code counts [K] (or [R, K] per depth).

- `save_reconstruction_grid`: inputs on the top row, their reconstructions below (PIL only).
- `save_codebook_usage`: per branch, every code's EMA count sorted high to low on a log axis,
  with the used fraction and perplexity in the title (matplotlib, Agg backend).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import torch
from PIL import Image


def _uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    return images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_reconstruction_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, path: str,
                             max_images: int = 8, scale: int = 1) -> None:
    """Write a 2-row grid: inputs above, reconstructions below (up to `max_images` columns).

    Args:
        inputs, reconstructions: [B, 3, H, W] in [-1, 1].
        path: the PNG to write (directories are created).
        scale: nearest-neighbour enlargement, for tiny images.
    """
    n = min(max_images, inputs.shape[0])
    top, bottom = _uint8(inputs[:n]), _uint8(reconstructions[:n])
    h, w = top.shape[1], top.shape[2]
    pad = 2
    grid = Image.new("RGB", (n * (w + pad) + pad, 2 * (h + pad) + pad), (128, 128, 128))
    for row, images in enumerate((top, bottom)):
        for i in range(n):
            grid.paste(Image.fromarray(images[i].numpy()), (pad + i * (w + pad), pad + row * (h + pad)))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


def share_in_use(counts: torch.Tensor, restart_level: float = 1.0) -> float:
    """The share of codes whose EMA count is above the dead-code restart level (at any depth
    of [R, K] counts). A restart sets a code's count exactly to that level, so ">=" would count
    every restarted, never-chosen code as used (the PNG said 100% while a batch used 40%)."""
    live = counts.detach().float().cpu() > restart_level
    return float((live.any(0) if live.dim() == 2 else live).float().mean())


def save_codebook_usage(counts: Mapping[str, torch.Tensor], path: str, title: str = "",
                        restart_levels: Optional[Mapping[str, float]] = None) -> None:
    """Plot each branch's sorted EMA code counts (log scale) into one PNG.

    Args:
        counts: branch name -> EMA counts [K] (or [R, K]: depths are summed).
        path: the PNG to write.
        restart_levels: branch name -> its quantizer's dead_code_threshold (default 1; see `share_in_use`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(counts), figsize=(5 * len(counts), 3.2), squeeze=False)
    for ax, (name, c) in zip(axes[0], counts.items()):
        restart_level = (restart_levels or {}).get(name, 1.0)
        used = share_in_use(c, restart_level)
        c = c.detach().float().cpu()
        if c.dim() == 2:
            c = c.sum(0)
        p = c / c.sum().clamp_min(1e-12)
        perplexity = float(torch.exp(-torch.special.xlogy(p, p).sum()))
        ax.semilogy(torch.sort(c, descending=True).values.clamp_min(1e-3).numpy())
        ax.set_title(f"{name}: {used:.0%} of {c.numel()} codes above the restart level ({restart_level:g}), "
                     f"perplexity {perplexity:.0f}", fontsize=8)
        ax.set_xlabel("code (sorted by EMA count)")
        ax.set_ylabel("EMA count")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
