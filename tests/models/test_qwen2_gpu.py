"""Packed attention on a GPU: the backend `auto` picks (flash-attn when installed, else
FlexAttention) against each document run alone, forward and backward (skipped without CUDA).

Tolerances: bf16 activations of O(1) carry ~3 significant digits; both sides round
differently, so outputs and gradients are compared at 2e-2 (a few bf16 ulps). The
reference is SDPA on each document alone, upcast from the same bf16 weights.
"""

from __future__ import annotations

import pytest
import torch

from megadual.config.schema import BackboneConfig
from megadual.models.qwen2 import build_qwen2
from megadual.models.qwen2.attention import flash_attn_available, plan_attention

from .test_qwen2_parity import _packed_batch as packed_batch

pytestmark = pytest.mark.gpu
CFG = BackboneConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
ROWS = [[20, 30, 14, 0, 64], [128]]  # an empty document and rows of several


def _packed_batch():
    ids, positions, cu_seqlens, _ = packed_batch(ROWS, CFG.vocab_size)
    return ids.cuda(), positions.cuda(), cu_seqlens.cuda()


def test_auto_backend_on_cuda_is_flash_or_flex():
    ids, _, cu = _packed_batch()
    plan = plan_attention(*ids.shape, ids.device, torch.bfloat16, cu)
    assert plan.backend == ("flash" if flash_attn_available() else "flex")


def test_packed_forward_and_backward_equal_each_document_alone():
    model = build_qwen2(CFG, seed=0).cuda().bfloat16()
    ids, positions, cu = _packed_batch()
    packed = model(ids, position_ids=positions, cu_seqlens=cu).float()
    packed.square().mean().backward()
    packed_grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad()

    alone_parts = []
    for r, row in enumerate(ROWS):
        start = 0
        for n in row:
            if n:
                alone = model(ids[r : r + 1, start : start + n]).float()[0]  # plain causal: SDPA
                torch.testing.assert_close(packed[r, start : start + n], alone, atol=2e-2, rtol=2e-2)
                alone_parts.append(alone)
            start += n
    # The same loss as the packed one: mean of squares over every token of every row.
    (torch.cat(alone_parts).square().sum() / packed.numel()).backward()
    for name, p in model.named_parameters():
        scale = packed_grads[name].abs().max().clamp_min(1e-6)
        assert (p.grad.float() - packed_grads[name]).abs().max() / scale < 2e-2, name
