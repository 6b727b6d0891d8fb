"""Residual vector quantizer with EMA codebooks and dead-code restart (DualToken's RQ).

Shapes: B... leading dims, N rows (flattened B...), D codebook dim, K codes, R depth,
C codebooks (1 when shared by all depths, else R), M dead codes.

Projections into and out of the codebook dim stay outside this module. The codebooks are
not trained by the optimizer: they follow an exponential moving average of the vectors
assigned to them (persistent buffers, so they are checkpointed with the model), and codes
whose average use drops below a threshold are restarted from current-batch vectors.

Data parallelism: each rank computes its batch's per-code counts and sums; these are
all-reduced over the data-parallel group passed in (never the world group: tensor-parallel
peers hold the same tokens and would be counted twice), and the random restart rows are
drawn on the group's first rank and broadcast, so every rank's codebook stays identical and
equal to what a single process that saw the union of the ranks' batches would hold.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megadual import ops


class RQUsage(NamedTuple):
    """Code usage of one batch (over the data-parallel group in training, local in eval).

    Attributes:
        counts: [K] (shared codebook: all depths together) or [R, K] float32 assignments per code.
        perplexity: [] or [R], exp(entropy of the usage distribution); K means uniform use.
        fraction_used: [] or [R], fraction of codes assigned at least once.
    """

    counts: torch.Tensor
    perplexity: torch.Tensor
    fraction_used: torch.Tensor


class RQOutput(NamedTuple):
    """What ResidualQuantizer.forward returns.

    Attributes:
        quantized: [B..., D], the sum over depths of the chosen codes, with straight-through
            gradients (d quantized / d x = identity).
        codes: [B..., R] int64 (or int32).
        commitment_loss: [] float32, mean over depths r of MSE(x, cumulative quantized after r),
            the quantized side detached: it pulls x toward its codes, not the codes toward x.
        usage: RQUsage statistics of this batch.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    commitment_loss: torch.Tensor
    usage: RQUsage


def _usage(counts: torch.Tensor) -> RQUsage:
    total = counts.sum(-1, keepdim=True).clamp_min(1.0)
    p = counts / total
    # 0 * log 0 = 0: xlogy handles unused codes.
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return RQUsage(counts, entropy.exp(), (counts > 0).float().mean(-1))


class ResidualQuantizer(nn.Module):
    """Greedy residual VQ over R depths with EMA codebooks.

    Args:
        dim: D, the codebook dim (project to it before calling).
        codebook_size: K codes per codebook.
        depth: R residual depths.
        shared_codebook: one codebook for all depths (DualToken's default) or one per depth.
        decay: EMA decay of counts and sums, in [0, 1).
        eps: Laplace smoothing of the EMA counts, > 0.
        dead_code_threshold: a code whose EMA count falls below this is restarted from a random
            current-batch vector (0 disables restarts).
        dp_group: the data-parallel process group whose ranks see different data; None means
            no synchronisation (a single process, or ranks that all see the same tokens).
        seed: seeds the generator of the restart draws (kept in the state dict).
        codes_dtype: torch.int64 or torch.int32.

    Buffers (persistent): codebook [K, D] or [R, K, D], cluster_size [K] or [R, K],
    embed_sum like codebook; all float32. The codebook starts as N(0, 1) samples with an EMA
    count of 1 each, so unused initial codes die after one step and are replaced by data.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        depth: int,
        *,
        shared_codebook: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 1.0,
        dp_group: Optional[dist.ProcessGroup] = None,
        seed: int = 0,
        codes_dtype: torch.dtype = torch.int64,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size), ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ResidualQuantizer: {name} must be a positive integer, got {value!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ResidualQuantizer: decay must be in [0, 1), got {decay}")
        if not eps > 0.0:
            raise ValueError(f"ResidualQuantizer: eps must be > 0, got {eps}")
        if dead_code_threshold < 0:
            raise ValueError(f"ResidualQuantizer: dead_code_threshold must be >= 0, got {dead_code_threshold}")
        if codes_dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ResidualQuantizer: codes_dtype must be torch.int64 or torch.int32, got {codes_dtype}")
        self.dim, self.codebook_size, self.depth = dim, codebook_size, depth
        self.shared_codebook = shared_codebook
        self.decay, self.eps, self.dead_code_threshold = decay, eps, dead_code_threshold
        self.dp_group = dp_group
        self.codes_dtype = codes_dtype
        shape = (codebook_size, dim) if shared_codebook else (depth, codebook_size, dim)
        codebook = torch.randn(shape)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(shape[:-1]))
        self.register_buffer("embed_sum", codebook.clone())
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def num_codebooks(self) -> int:
        return 1 if self.shared_codebook else self.depth

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, depth={self.depth}, "
            f"shared_codebook={self.shared_codebook}, decay={self.decay}, "
            f"dead_code_threshold={self.dead_code_threshold}"
        )

    # The restart generator is state too: a resumed run must draw the same rows.
    def get_extra_state(self):
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state) -> None:
        self._generator.set_state(state["generator"])

    def forward(self, x: torch.Tensor) -> RQOutput:
        """Quantize x; in training mode also update the EMA codebooks and restart dead codes.

        Args:
            x: [B..., D] float32 / bfloat16 / float16, at least one row.

        Returns:
            RQOutput(quantized [B..., D], codes [B..., R], commitment_loss [], usage).
        """
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"ResidualQuantizer: input last dim must be the codebook dim {self.dim}, got shape {list(x.shape)}"
            )
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)  # [N, D]
        rows = flat.detach().contiguous()
        enc = ops.rq_encode(rows, self.codebook, self.depth, return_cumulative=True, codes_dtype=self.codes_dtype)
        cumulative = enc.cumulative  # [R, N, D], no grad
        # Mean over depths of per-depth MSEs = one MSE over [R, N, D] (every depth has N x D terms).
        commitment = F.mse_loss(flat.float().unsqueeze(0).expand(self.depth, -1, -1), cumulative.float())
        # Straight-through: the value is exactly the codes' sum, the gradient is the identity.
        quantized = enc.quantized.to(flat.dtype) + (flat - flat.detach())
        if self.training:
            counts = self._ema_step(rows, enc.codes, cumulative)
        else:
            counts = self._count(enc.codes)
        return RQOutput(
            quantized.reshape(*lead, self.dim),
            enc.codes.reshape(*lead, self.depth),
            commitment,
            _usage(counts),
        )

    # ---------------------------------------------------------------------------------------

    def _dp_size(self) -> int:
        return 1 if self.dp_group is None else dist.get_world_size(self.dp_group)

    def _count(self, codes: torch.Tensor) -> torch.Tensor:
        return code_counts(codes, self.codebook_size, self.shared_codebook)

    @torch.no_grad()
    def _ema_step(self, rows: torch.Tensor, codes: torch.Tensor, cumulative: torch.Tensor) -> torch.Tensor:
        if self._dp_size() == 1:
            ops.ema_update_(self.cluster_size, self.embed_sum, self.codebook, rows, codes, self.decay, self.eps)
            counts = self._count(codes)
        else:
            counts, sums = ops.rq_code_stats(rows, self.codebook, codes)
            # One all-reduce for both: they are small (K x (D + 1)) and latency-bound.
            flat = torch.cat([counts.flatten(), sums.flatten()])
            dist.all_reduce(flat, group=self.dp_group)
            counts = flat[: counts.numel()].view_as(counts)
            sums = flat[counts.numel() :].view_as(sums)
            ops.ema_apply_(self.cluster_size, self.embed_sum, self.codebook, counts, sums, self.decay, self.eps)
        if self.dead_code_threshold > 0 and bool((self.cluster_size < self.dead_code_threshold).any()):
            self._restart_dead_codes(rows, cumulative)
        return counts

    def _restart_dead_codes(self, rows: torch.Tensor, cumulative: torch.Tensor) -> None:
        # The vector depth r quantized is x minus the codes of depths < r.
        previous = torch.cat([torch.zeros_like(cumulative[:1]), cumulative[:-1]]).float()  # [R, N, D]
        residuals = rows.float().unsqueeze(0) - previous  # [R, N, D]
        for c in range(self.num_codebooks):
            if self.shared_codebook:
                # Row-major (row, depth) order, so the ranks' pools concatenate in rank order into
                # the pool a single process would have drawn from.
                samples = residuals.transpose(0, 1).reshape(-1, self.dim)  # [N * R, D]
                state = (self.cluster_size, self.embed_sum, self.codebook)
            else:
                samples = residuals[c]  # [N, D]
                state = (self.cluster_size[c], self.embed_sum[c], self.codebook[c])
            if self._dp_size() == 1:
                ops.dead_code_restart_(*state, samples, self.dead_code_threshold, self._generator)
            else:
                self._restart_across_group(*state, samples)

    def _restart_across_group(self, cluster_size, embed_sum, codebook, samples) -> None:
        restart_dead_codes_(cluster_size, [(embed_sum, codebook, samples)], self.dead_code_threshold, self._generator,
                            self.dp_group)


def code_counts(codes: torch.Tensor, codebook_size: int, shared_codebook: bool) -> torch.Tensor:
    """Assignments per code of codes [N, R]: float32 [K] (a shared codebook: all depths) or [R, K]."""
    codes = codes.long()
    if shared_codebook:
        return torch.bincount(codes.flatten(), minlength=codebook_size).float()
    return torch.stack([torch.bincount(codes[:, r], minlength=codebook_size) for r in range(codes.shape[1])]).float()


def restart_dead_codes_(cluster_size: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                        threshold: float, generator: torch.Generator,
                        group: Optional[dist.ProcessGroup] = None) -> None:
    """Restart the dead codes (EMA count below `threshold`) of codebooks that share one count.

    One codebook, or a pair under one index (TokenFlow's): each part is (embed_sum [K, D_p],
    codebook [K, D_p], samples [S, D_p]) and row s of every part's samples is the same position,
    so a dead code takes one drawn row in every part. With a data-parallel `group` the rows are
    drawn over the union of the ranks' samples (in rank order) on the group's first rank and
    broadcast, and each rank fills in the rows it owns: every rank applies the same codes.
    Collective over `group` when one is given (cluster_size must already agree across it).
    """
    dead = ops.find_dead_codes(cluster_size, threshold)
    if dead.numel() == 0:
        return
    num_samples = parts[0][2].shape[0]
    if group is None:
        rows = ops.sample_restart_rows(dead.numel(), num_samples, generator).to(parts[0][2].device)
        replacements = [samples[rows].float() for _, _, samples in parts]
    else:
        replacements = _draw_across_group(dead.numel(), [samples for _, _, samples in parts], generator, group)
    for (embed_sum, codebook, _), chosen in zip(parts, replacements):
        ops.restart_codes_(cluster_size, embed_sum, codebook, dead, chosen, threshold)


def _draw_across_group(num_dead: int, samples: list[torch.Tensor], generator: torch.Generator,
                       group: dist.ProcessGroup) -> list[torch.Tensor]:
    """`num_dead` rows of the union of every rank's `samples` (each part [S_rank, D_p]), drawn on
    the group's first rank: one [num_dead, D_p] float32 tensor per part, equal on every rank."""
    device = samples[0].device
    world = dist.get_world_size(group)
    local = torch.tensor([samples[0].shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    sizes_list = [int(s) for s in sizes]
    offset = sum(sizes_list[: dist.get_rank(group)])
    rows = torch.empty(num_dead, dtype=torch.int64, device=device)
    if dist.get_rank(group) == 0:
        rows.copy_(ops.sample_restart_rows(num_dead, sum(sizes_list), generator))
    dist.broadcast(rows, group=group, group_src=0)
    # Each rank fills in the rows it owns; the sum over ranks is then exact (x + 0). One
    # all-reduce carries every part.
    mine = (rows >= offset) & (rows < offset + samples[0].shape[0])
    dims = [s.shape[1] for s in samples]
    replacements = torch.zeros(num_dead, sum(dims), dtype=torch.float32, device=device)
    replacements[mine] = torch.cat([s[rows[mine] - offset].float() for s in samples], dim=1)
    dist.all_reduce(replacements, group=group)
    return list(replacements.split(dims, dim=1))
