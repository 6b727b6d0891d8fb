"""Input embedding of visual positions: pixel and semantic codes -> one backbone-sized vector.

Legend: N visual positions, R residual depth, K codebook size, C code embedding dim,
D backbone hidden, P pixel share of D (D - P semantic).

At a visual position each branch sums its R code embeddings (one table per branch shared
across depths, as the tokenizer shares its codebook, so the sum is the tokenizer's
cumulative quantized vector when the table is its codebook), runs a 2-layer MLP, and the two
results are concatenated: [pixel (P) | semantic (D - P)] = D. The tables are learned from
scratch or copied from the tokenizer's codebooks (`init_from_codebooks_`).
The module is replicated on tensor-parallel ranks (it is small and its inputs are
replicated), so its output and gradients are identical on every rank.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megadual.config.schema import MLLMConfig

from .init_layers import NormalLinear


def check_codes(codes: torch.Tensor, codebook_size: int, name: str) -> None:
    """Raise ValueError if any code lies outside [0, codebook_size) (costs one reduction)."""
    if codes.numel() == 0:
        return
    low, high = (int(x) for x in torch.aminmax(codes))
    if low < 0 or high >= codebook_size:
        raise ValueError(
            f"{name} holds code {high if high >= codebook_size else low}, outside [0, {codebook_size}); "
            f"check mllm.{name.split('_')[0]}_codebook_size matches the tokenizer that made the codes"
        )


class CodeProjector(nn.Module):
    """One branch: code table shared across depths, sum over depth, Linear -> GELU -> Linear.

    Args:
        codebook_size: K; code_dim: C; out_dim: the branch's share of D; hidden_dim: MLP width.
    Shapes: codes [..., R] -> [..., out_dim].
    """

    def __init__(self, codebook_size: int, code_dim: int, out_dim: int, hidden_dim: int, init_std: float):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim) * init_std)  # [K, C]
        self.fc1 = NormalLinear(code_dim, hidden_dim, init_std)
        self.fc2 = NormalLinear(hidden_dim, out_dim, init_std)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        lead = codes.shape[:-1]
        # embedding_bag sums the R embeddings of a row without materialising [N, R, C].
        summed = F.embedding_bag(codes.reshape(-1, codes.shape[-1]), self.codebook, mode="sum")  # [N, C]
        # Explicit width, not -1: a prompt may have no visual position (N = 0).
        return self.fc2(F.gelu(self.fc1(summed))).view(*lead, self.fc2.out_features)

    @torch.no_grad()
    def init_from_codebook_(
        self, codebook: torch.Tensor, projection: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    ) -> None:
        """Copy a tokenizer codebook [K, Dc] into the table, through `projection` if given.

        `projection` maps [K, Dc] -> [K, C] (e.g. the tokenizer's post-quantization linear).
        The sum over depth of projected entries equals the projection of the quantized vector
        only for a linear map without bias; an affine projection adds its bias once per depth.
        """
        table = projection(codebook) if projection is not None else codebook
        if tuple(table.shape) != tuple(self.codebook.shape):
            raise ValueError(
                f"the codebook{' after projection' if projection is not None else ''} has shape "
                f"{tuple(table.shape)}, the embedding table {tuple(self.codebook.shape)} "
                "(codebook_size, code_embed_dim); set mllm.*_codebook_size / mllm.code_embed_dim to the "
                "tokenizer's sizes, or pass a projection to code_embed_dim"
            )
        self.codebook.copy_(table)


class VisualEmbedding(nn.Module):
    """Pixel and semantic code embeddings concatenated to the backbone's hidden size.

    Args:
        cfg: the `mllm` config section (codebook sizes, code_embed_dim, pixel_embed_dim,
            projector_hidden, init_std).
        hidden_size: D.
    """

    def __init__(self, cfg: MLLMConfig, hidden_size: int):
        super().__init__()
        pixel_dim = cfg.resolved_pixel_embed_dim(hidden_size)
        if not 1 <= pixel_dim < hidden_size:
            raise ValueError(
                f"mllm.pixel_embed_dim={pixel_dim} must lie in [1, hidden_size={hidden_size}) "
                "(the semantic branch gets the rest); leave it null for hidden_size // 2"
            )
        semantic_dim = hidden_size - pixel_dim
        self.cfg = cfg
        self.pixel = CodeProjector(cfg.pixel_codebook_size, cfg.code_embed_dim, pixel_dim,
                                   cfg.projector_hidden or pixel_dim, cfg.init_std)
        self.semantic = CodeProjector(cfg.semantic_codebook_size, cfg.code_embed_dim, semantic_dim,
                                      cfg.projector_hidden or semantic_dim, cfg.init_std)

    def forward(self, pixel_codes: torch.Tensor, semantic_codes: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Embed visual positions.

        Args:
            pixel_codes, semantic_codes: int64 [..., R], R = mllm.depth.
            check: raise ValueError on codes outside a codebook (one reduction each).

        Returns:
            [..., D]: [pixel branch | semantic branch].
        """
        if pixel_codes.shape != semantic_codes.shape or pixel_codes.shape[-1:] != (self.cfg.depth,):
            raise ValueError(
                f"pixel_codes {tuple(pixel_codes.shape)} and semantic_codes {tuple(semantic_codes.shape)} must "
                f"have one shape [..., depth={self.cfg.depth}]"
            )
        if check:
            check_codes(pixel_codes, self.cfg.pixel_codebook_size, "pixel_codes")
            check_codes(semantic_codes, self.cfg.semantic_codebook_size, "semantic_codes")
        return torch.cat([self.pixel(pixel_codes), self.semantic(semantic_codes)], dim=-1)

    def init_from_codebooks_(
        self,
        pixel_codebook: torch.Tensor,
        semantic_codebook: torch.Tensor,
        pixel_projection: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        semantic_projection: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        """Copy the tokenizer's codebooks [K, Dc] into the two tables (see `CodeProjector.init_from_codebook_`)."""
        self.pixel.init_from_codebook_(pixel_codebook, pixel_projection)
        self.semantic.init_from_codebook_(semantic_codebook, semantic_projection)
