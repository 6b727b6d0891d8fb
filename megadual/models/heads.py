"""Depth-transformer heads: predict the R residual codes of one visual position, depth by depth.

Legend: N visual positions (rows), D backbone hidden, W head width, R residual depth,
K codebook size, L head layers.

Input variant (RQ-Transformer's, which the DualToken paper describes): the input at depth 1
is a projection of the backbone hidden state h; the input at depth d > 1 is the *sum* of
the embeddings of the codes chosen at depths 1..d-1, plus a learned embedding of the depth.
The sum is what the residual quantizer has reconstructed so far (its cumulative quantized
vector, in the head's own embedding space), so the head predicts "the residual left after
this partial reconstruction", the same question the quantizer answered at depth d; h stays
visible to every depth through causal attention to depth 1. (The other variant, feeding only
the embedding of code d-1, makes the head re-sum the previous codes in attention.)
One code table per head is shared across depths, as the tokenizer shares its codebook.

Training uses teacher forcing (`forward`: all depths at once, causal over depth);
generation decodes one depth at a time with a KV cache over depth (`start` / `step`, or
`generate`), and both give the same logits.
Tensor parallelism: the heads are small (L = 3 layers over R <= 8 positions) and stay
replicated on every tensor-parallel rank; their inputs (backbone outputs) are replicated,
so every rank computes the same logits and the same gradients without a collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .init_layers import NormalEmbedding, NormalLinear


def _linear(in_features: int, out_features: int, std: float) -> nn.Linear:
    return NormalLinear(in_features, out_features, std)


class DepthBlock(nn.Module):
    """Pre-norm transformer block over the depth axis: causal self-attention, then a GELU MLP.

    Args:
        width: W; num_heads: attention heads (W must be a multiple); mlp_ratio: MLP width / W.
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, init_std: float):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"head width {width} is not a multiple of the head count {num_heads}")
        self.num_heads = num_heads
        self.attn_norm = nn.RMSNorm(width, eps=1e-6)
        self.qkv = _linear(width, 3 * width, init_std)
        self.out = _linear(width, width, init_std)
        self.mlp_norm = nn.RMSNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(_linear(width, mlp_ratio * width, init_std), nn.GELU(),
                                 _linear(mlp_ratio * width, width, init_std))

    def forward(self, x: torch.Tensor, cache: Optional[list] = None) -> torch.Tensor:
        """Shapes: x [N, S, W] -> [N, S, W].

        Without `cache`: the S depths attend causally among themselves (teacher forcing).
        With `cache` (a list of at most one (k, v) pair, owned by `DepthState`): x holds the
        next depth only (S = 1); it attends to the cached depths and itself, and its keys and
        values are appended. The newest depth is always last, so no mask is needed.
        """
        n, s, w = x.shape
        # Explicit head size, not -1: a micro-batch may have no visual target (N = 0).
        q, k, v = self.qkv(self.attn_norm(x)).view(n, s, 3, self.num_heads, w // self.num_heads).unbind(2)  # [N, S, H, E]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [N, H, S, E]
        if cache is not None:
            if cache:
                past_k, past_v = cache.pop()
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # [N, H, d, E]
            cache.append((k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
        x = x + self.out(attn.transpose(1, 2).reshape(n, s, w))
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class DepthState:
    """Incremental decoding state of one `DepthHead` for N positions.

    Attributes:
        hidden: the backbone hidden states [N, D] being decoded.
        depth: how many depths have been fed (0 before the first `step`).
        partial: sum of the embeddings of the codes chosen so far [N, W] (None at depth 0).
        caches: per block, the keys/values of the depths fed so far ([N, H, depth, E]).
    """

    hidden: torch.Tensor
    depth: int = 0
    partial: Optional[torch.Tensor] = None
    caches: list = field(default_factory=list)


class DepthHead(nn.Module):
    """A small causal transformer over the RQ depth with one classifier per depth.

    Args:
        hidden_size: D, the backbone's hidden size (the depth-1 input is projected from it).
        codebook_size: K.
        depth: R.
        width: W; num_layers: L (3 in the paper); num_heads; mlp_ratio: MLP width / W.
        init_std: normal init of every weight matrix (biases zero, norms one).
    """

    def __init__(self, hidden_size: int, codebook_size: int, depth: int, width: int, num_layers: int = 3,
                 num_heads: int = 8, mlp_ratio: int = 4, init_std: float = 0.02):
        super().__init__()
        self.codebook_size, self.depth = codebook_size, depth
        self.input_proj = _linear(hidden_size, width, init_std)
        self.code_embed = NormalEmbedding(codebook_size, width, init_std)
        self.depth_embed = nn.Parameter(torch.randn(depth, width) * init_std)
        self.blocks = nn.ModuleList(DepthBlock(width, num_heads, mlp_ratio, init_std) for _ in range(num_layers))
        self.norm = nn.RMSNorm(width, eps=1e-6)
        # One classifier per depth, stored as one [R, K, W] weight so all depths run as one einsum.
        self.classifier_weight = nn.Parameter(torch.randn(depth, codebook_size, width) * init_std)
        self.classifier_bias = nn.Parameter(torch.zeros(depth, codebook_size))

    def inputs(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced inputs of every depth.

        Shapes: hidden [N, D], codes [N, R] -> [N, R, W]: depth 1 is proj(h), depth d the sum
        of the embeddings of codes 1..d-1; each plus its depth embedding. The last depth's
        code is never an input.
        """
        first = self.input_proj(hidden)[:, None]  # [N, 1, W]
        partial = self.code_embed(codes[:, : self.depth - 1]).cumsum(dim=1)  # [N, R-1, W]
        return torch.cat([first, partial], dim=1) + self.depth_embed

    def classify(self, x: torch.Tensor, depth: Optional[int] = None) -> torch.Tensor:
        """Final norm + per-depth classifier. Shapes: x [N, R, W] -> [N, R, K], or, with
        `depth` = d (0-based), x [N, W] -> [N, K] through classifier d."""
        x = self.norm(x)
        if depth is None:
            return torch.einsum("nrw,rkw->nrk", x, self.classifier_weight) + self.classifier_bias
        return F.linear(x, self.classifier_weight[depth], self.classifier_bias[depth])

    def check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 2 or codes.shape[1] != self.depth:
            raise ValueError(f"codes must be [positions, depth={self.depth}], got shape {tuple(codes.shape)}")

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of every depth.

        Args:
            hidden: backbone hidden states [N, D] of the positions whose next codes are predicted.
            codes: int64 [N, R], the target codes (their prefixes are the inputs).

        Returns:
            logits [N, R, K]; row d scores the code at depth d given h and codes < d.
        """
        self.check_codes(codes)
        x = self.inputs(hidden, codes)
        for block in self.blocks:
            x = block(x)
        return self.classify(x)

    # ------------------------------------------------------------------ incremental decoding

    def start(self, hidden: torch.Tensor) -> DepthState:
        """A fresh decoding state for hidden states [N, D]; the first `step` scores depth 1."""
        return DepthState(hidden=hidden, caches=[[] for _ in self.blocks])

    def step(self, state: DepthState, prev_codes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feed one depth and return the logits of the next code.

        Args:
            state: from `start`, advanced in place.
            prev_codes: int64 [N], the codes chosen at the previous depth (None at the first step).

        Returns:
            logits [N, K] of the code at depth `state.depth` (0-based, before the increment).
        """
        d = state.depth
        if d >= self.depth:
            raise ValueError(f"all {self.depth} depths are decoded; start a new state for the next position")
        if (prev_codes is None) != (d == 0):
            raise ValueError("pass prev_codes at every step but the first (the codes chosen at the previous depth)")
        if d == 0:
            x = self.input_proj(state.hidden)  # [N, W]
        else:
            emb = self.code_embed(prev_codes)
            state.partial = emb if state.partial is None else state.partial + emb  # [N, W]
            x = state.partial
        x = (x + self.depth_embed[d])[:, None]  # [N, 1, W]
        for block, cache in zip(self.blocks, state.caches):
            x = block(x, cache)
        state.depth = d + 1
        return self.classify(x[:, 0], depth=d)

    def generate(self, hidden: torch.Tensor, choose: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """Decode the R codes of each position depth by depth.

        Args:
            hidden: [N, D].
            choose: maps (logits [N, K], depth d) to the chosen codes [N] (e.g. CFG + sampling;
                it may tie rows together, as CFG ties a conditional and an unconditional row).

        Returns:
            int64 codes [N, R].
        """
        state, codes = self.start(hidden), []
        for d in range(self.depth):
            logits = self.step(state, codes[-1] if codes else None)
            codes.append(choose(logits, d))
        return torch.stack(codes, dim=1)
