"""TokenFlow's shared mapping: a semantic and a pixel codebook under one residual index.

Shapes: B... leading dims, N rows (flattened B...), Ds / Dp semantic / pixel codebook dims,
K codes, R depth.

Code k pairs semantic vector k with pixel vector k. At each depth the index minimising
d_sem + w * d_pix over the two residuals is chosen (`ops.rq_joint_encode`), so one token stream
decodes to pixels through the pixel codes and reads as semantics through the semantic ones.
The codebooks follow EMAs of the vectors assigned to them like `ResidualQuantizer`'s, with one
count per code for the pair (both codebooks see the same assignments), and a dead code is
restarted in both codebooks from one drawn position. Data parallel: counts and both sums go
in one all-reduce over `dp_group`, restart rows are drawn on its first rank, so every rank
holds the codebooks a single process that saw the union of the batches would hold.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megadual import ops

from .quantizer import RQUsage, _usage, code_counts, restart_dead_codes_


class JointRQOutput(NamedTuple):
    """What JointResidualQuantizer.forward returns.

    Attributes:
        quantized_sem, quantized_pix: [B..., Ds] / [B..., Dp], sums over depths of each part's
            codes, with straight-through gradients.
        codes: [B..., R] int64 (or int32), the shared index.
        commitment_sem, commitment_pix: [] float32, each part's mean over depths of
            MSE(x, cumulative quantized), the quantized side detached.
        usage: RQUsage of this batch's codes (the pair shares them).
    """

    quantized_sem: torch.Tensor
    quantized_pix: torch.Tensor
    codes: torch.Tensor
    commitment_sem: torch.Tensor
    commitment_pix: torch.Tensor
    usage: RQUsage


class JointResidualQuantizer(nn.Module):
    """Greedy residual VQ of two features with one index per depth and EMA codebooks.

    Args:
        sem_dim, pix_dim: Ds and Dp, the two codebook dims.
        codebook_size: K codes in each codebook.
        depth: R residual depths.
        pixel_weight: w in d_sem + w * d_pix (TokenFlow: 1).
        shared_codebook: one codebook pair for all depths, or one per depth.
        decay, eps, dead_code_threshold, dp_group, seed, codes_dtype: as ResidualQuantizer's.

    Buffers (persistent, float32): codebook_sem [K, Ds] / [R, K, Ds], codebook_pix likewise,
    embed_sum_sem / embed_sum_pix like them, cluster_size [K] / [R, K] (the pair's one count).
    """

    def __init__(self, sem_dim: int, pix_dim: int, codebook_size: int, depth: int, *, pixel_weight: float = 1.0,
                 shared_codebook: bool = True, decay: float = 0.99, eps: float = 1e-5,
                 dead_code_threshold: float = 1.0, dp_group: Optional[dist.ProcessGroup] = None, seed: int = 0,
                 codes_dtype: torch.dtype = torch.int64):
        super().__init__()
        for name, value in (("sem_dim", sem_dim), ("pix_dim", pix_dim), ("codebook_size", codebook_size),
                            ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"JointResidualQuantizer: {name} must be a positive integer, got {value!r}")
        if not pixel_weight >= 0.0:
            raise ValueError(f"JointResidualQuantizer: pixel_weight must be >= 0, got {pixel_weight}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"JointResidualQuantizer: decay must be in [0, 1), got {decay}")
        self.sem_dim, self.pix_dim, self.codebook_size, self.depth = sem_dim, pix_dim, codebook_size, depth
        self.pixel_weight, self.shared_codebook = pixel_weight, shared_codebook
        self.decay, self.eps, self.dead_code_threshold = decay, eps, dead_code_threshold
        self.dp_group, self.codes_dtype = dp_group, codes_dtype
        lead = (codebook_size,) if shared_codebook else (depth, codebook_size)
        generator = torch.Generator().manual_seed(seed)
        for part, dim in (("sem", sem_dim), ("pix", pix_dim)):
            codebook = torch.randn(*lead, dim, generator=generator)
            self.register_buffer(f"codebook_{part}", codebook)
            self.register_buffer(f"embed_sum_{part}", codebook.clone())
        # Starts at 1 like ResidualQuantizer's: unused initial codes die after one step.
        self.register_buffer("cluster_size", torch.ones(lead))
        self._generator = generator

    # The restart generator is state too: a resumed run must draw the same rows.
    def get_extra_state(self):
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state) -> None:
        self._generator.set_state(state["generator"])

    def extra_repr(self) -> str:
        return (f"sem_dim={self.sem_dim}, pix_dim={self.pix_dim}, codebook_size={self.codebook_size}, "
                f"depth={self.depth}, pixel_weight={self.pixel_weight}, shared_codebook={self.shared_codebook}")

    def forward(self, x_sem: torch.Tensor, x_pix: torch.Tensor) -> JointRQOutput:
        """Quantize both features; in training mode also update the EMA codebooks and restart dead codes.

        Args:
            x_sem: [B..., Ds], x_pix: [B..., Dp], the same positions, float32 / bfloat16 / float16.
        """
        if x_sem.shape[-1] != self.sem_dim or x_pix.shape[-1] != self.pix_dim or x_sem.shape[:-1] != x_pix.shape[:-1]:
            raise ValueError(f"JointResidualQuantizer: expected [..., {self.sem_dim}] and [..., {self.pix_dim}] over "
                             f"the same positions, got {list(x_sem.shape)} and {list(x_pix.shape)}")
        lead = x_sem.shape[:-1]
        flat_sem, flat_pix = x_sem.reshape(-1, self.sem_dim), x_pix.reshape(-1, self.pix_dim)  # [N, Ds], [N, Dp]
        rows_sem, rows_pix = flat_sem.detach().contiguous(), flat_pix.detach().to(flat_sem.dtype).contiguous()
        enc = ops.rq_joint_encode(rows_sem, rows_pix, self.codebook_sem, self.codebook_pix, self.depth,
                                  self.pixel_weight, return_cumulative=True, codes_dtype=self.codes_dtype)
        commitments = [F.mse_loss(flat.float().unsqueeze(0).expand(self.depth, -1, -1), cumulative.float())
                       for flat, cumulative in ((flat_sem, enc.cumulative_sem), (flat_pix, enc.cumulative_pix))]
        if self.training:
            counts = self._ema_step(rows_sem, rows_pix, enc)
        else:
            counts = code_counts(enc.codes, self.codebook_size, self.shared_codebook)
        # Straight-through: the value is exactly the codes' sum, the gradient is the identity.
        q_sem = enc.quantized_sem.to(flat_sem.dtype) + (flat_sem - flat_sem.detach())
        q_pix = enc.quantized_pix.to(flat_pix.dtype) + (flat_pix - flat_pix.detach())
        return JointRQOutput(q_sem.reshape(*lead, self.sem_dim), q_pix.reshape(*lead, self.pix_dim),
                             enc.codes.reshape(*lead, self.depth), *commitments, _usage(counts))

    def _sync_group(self) -> Optional[dist.ProcessGroup]:
        """The data-parallel group to synchronise over, or None when there is nothing to sync."""
        return self.dp_group if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1 else None

    @torch.no_grad()
    def _ema_step(self, rows_sem: torch.Tensor, rows_pix: torch.Tensor, enc: ops.RQJointEncoding) -> torch.Tensor:
        counts, sums_sem = ops.rq_code_stats(rows_sem, self.codebook_sem, enc.codes)
        _, sums_pix = ops.rq_code_stats(rows_pix, self.codebook_pix, enc.codes)
        if self._sync_group() is not None:
            # One all-reduce for the counts and both sums: small (K x (1 + Ds + Dp)) and latency-bound.
            flat = torch.cat([counts.flatten(), sums_sem.flatten(), sums_pix.flatten()])
            dist.all_reduce(flat, group=self.dp_group)
            counts, sums_sem, sums_pix = (part.view_as(like) for part, like in zip(
                flat.split([counts.numel(), sums_sem.numel(), sums_pix.numel()]), (counts, sums_sem, sums_pix)))
        # ema_apply_ folds the counts into the count it is given: the pixel half folds them into a
        # copy of the count as it was, which then equals the semantic half's result.
        count_before = self.cluster_size.clone()
        ops.ema_apply_(self.cluster_size, self.embed_sum_sem, self.codebook_sem, counts, sums_sem, self.decay, self.eps)
        ops.ema_apply_(count_before, self.embed_sum_pix, self.codebook_pix, counts, sums_pix, self.decay, self.eps)
        if self.dead_code_threshold > 0 and bool((self.cluster_size < self.dead_code_threshold).any()):
            self._restart_dead_codes(rows_sem, rows_pix, enc)
        return counts

    def _restart_dead_codes(self, rows_sem, rows_pix, enc: ops.RQJointEncoding) -> None:
        # The vectors depth r quantized: each part's input minus its codes of depths < r.
        residuals = []
        for rows, cumulative in ((rows_sem, enc.cumulative_sem), (rows_pix, enc.cumulative_pix)):
            previous = torch.cat([torch.zeros_like(cumulative[:1]), cumulative[:-1]]).float()  # [R, N, D]
            residuals.append(rows.float().unsqueeze(0) - previous)
        group = self._sync_group()
        for c in range(1 if self.shared_codebook else self.depth):
            if self.shared_codebook:
                # Row-major (row, depth) order: the ranks' pools concatenate into a single process's.
                samples = [res.transpose(0, 1).reshape(-1, res.shape[-1]) for res in residuals]  # [N * R, D]
                count, sem, pix = self.cluster_size, (self.embed_sum_sem, self.codebook_sem), (self.embed_sum_pix,
                                                                                               self.codebook_pix)
            else:
                samples = [res[c] for res in residuals]  # [N, D]
                count = self.cluster_size[c]
                sem, pix = (self.embed_sum_sem[c], self.codebook_sem[c]), (self.embed_sum_pix[c], self.codebook_pix[c])
            restart_dead_codes_(count, [(*sem, samples[0]), (*pix, samples[1])], self.dead_code_threshold,
                                self._generator, group)
