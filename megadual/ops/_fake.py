"""Fake (meta) kernels of the megadual ops, for FakeTensor tracing (torch.compile, export).

Shapes: N rows, D dim, K codes, R depth, M dead codes.

Imported by megadual.ops right after `megadual._C` has registered the schemas; output shapes
and dtypes must match the C++ kernels in kernels/csrc.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("megadual::rq_encode")
def _rq_encode_fake(x, codebooks, depth, return_cumulative=False, codes_dtype=None, tile_n=0, tile_k=0):
    n, d = x.shape
    codes = x.new_empty((n, depth), dtype=codes_dtype or torch.int64)
    quantized = torch.empty_like(x)
    cumulative = x.new_empty((depth, n, d)) if return_cumulative else x.new_empty((0,))
    return codes, quantized, cumulative


@torch.library.register_fake("megadual::rq_joint_encode")
def _rq_joint_encode_fake(x_sem, x_pix, codebooks_sem, codebooks_pix, depth, pixel_weight=1.0,
                          return_cumulative=False, codes_dtype=None):
    n = x_sem.shape[0]
    codes = x_sem.new_empty((n, depth), dtype=codes_dtype or torch.int64)
    cum_sem = x_sem.new_empty((depth, *x_sem.shape)) if return_cumulative else x_sem.new_empty((0,))
    cum_pix = x_pix.new_empty((depth, *x_pix.shape)) if return_cumulative else x_sem.new_empty((0,))
    return codes, torch.empty_like(x_sem), torch.empty_like(x_pix), cum_sem, cum_pix


@torch.library.register_fake("megadual::rq_code_stats")
def _rq_code_stats_fake(x, codebooks, codes):
    counts = x.new_empty(codebooks.shape[:-1], dtype=torch.float32)
    sums = x.new_empty(codebooks.shape, dtype=torch.float32)
    return counts, sums


@torch.library.register_fake("megadual::ema_apply_")
def _ema_apply_fake(cluster_size, embed_sum, codebook, counts, sums, decay, eps):
    return None


@torch.library.register_fake("megadual::ema_update_")
def _ema_update_fake(cluster_size, embed_sum, codebook, x, codes, decay, eps):
    return None


@torch.library.register_fake("megadual::dead_code_restart_")
def _dead_code_restart_fake(cluster_size, embed_sum, codebook, samples, threshold=1.0, generator=None):
    # How many codes are dead depends on the data.
    num_dead = torch.library.get_ctx().new_dynamic_size()
    return cluster_size.new_empty((num_dead,), dtype=torch.int64)
