"""The packed-attention backends against an eager per-document reference and transformers.

Shapes: B batch, T time, H query heads, G key/value heads, E head dim.

FlexAttention runs forward only on CPU, so these tests compare forward outputs; the
forward+backward comparison on CUDA is in test_qwen2_gpu.py. Tolerance 1e-5 on fp32
outputs of O(1): the backends sum the same products in different orders.
"""

from __future__ import annotations

import math

import pytest
import torch

from megadual.config.schema import BackboneConfig
from megadual.models.qwen2 import load_hf
from megadual.models.qwen2 import attention as attn

from .hf_fixtures import make_hf_qwen2
from .test_qwen2_parity import _packed_batch

pytestmark = pytest.mark.skipif(not attn.flex_attention_available(), reason="this torch has no FlexAttention")
ATOL = 1e-5
LAYOUTS = {
    "one-row": [[20, 30, 14]],
    "two-rows-empty-doc": [[50, 0, 30, 20], [100]],
    "past-one-block": [[131, 60, 9]],  # T=200: not a multiple of flex's 128-token block
}


def _eager_causal(q, k, v):
    """softmax(q k^T / sqrt(E) + causal) v for one document, KV heads repeated. [T, H, E]."""
    t, h, e = q.shape
    k, v = (x.repeat_interleave(h // x.shape[1], dim=1) for x in (k, v))
    scores = torch.einsum("qhe,khe->hqk", q, k) / math.sqrt(e)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hqk,khe->qhe", scores.softmax(-1), v)


def _qkv(batch, seq_len, heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, seq_len, n, dim, generator=g) for n in (heads, kv_heads, kv_heads))


def _offsets(rows):
    out = [0]
    for row in rows:
        out.extend(out[-1] + n for n in row)
    return torch.tensor(out)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_flex_and_sdpa_equal_each_document_alone(layout):
    rows = LAYOUTS[layout]
    batch, seq_len = len(rows), sum(rows[0])
    q, k, v = _qkv(batch, seq_len)
    cu = _offsets(rows)
    outputs = {}
    for impl in ("flex", "sdpa"):
        plan = attn.plan_attention(batch, seq_len, q.device, q.dtype, cu, impl)
        assert plan.backend == impl
        with torch.no_grad():
            outputs[impl] = attn.causal_attention(q, k, v, plan)
    for r, row in enumerate(rows):
        start = 0
        for n in row:
            want = _eager_causal(q[r, start : start + n], k[r, start : start + n], v[r, start : start + n])
            for impl, out in outputs.items():
                torch.testing.assert_close(out[r, start : start + n], want, atol=ATOL, rtol=0, msg=impl)
            start += n


def test_flex_reference_can_fail():
    """The check above sees leaks: one document seeing the next changes its output."""
    q, k, v = _qkv(1, 64)
    with torch.no_grad():
        packed = attn.causal_attention(q, k, v, attn.plan_attention(1, 64, q.device, q.dtype, _offsets([[20, 44]]), "flex"))
        whole = attn.causal_attention(q, k, v, attn.plan_attention(1, 64, q.device, q.dtype, _offsets([[64]]), "flex"))
    assert (packed[0, 20:] - whole[0, 20:]).abs().max() > 1e-2


def test_model_with_flex_matches_transformers_packing(tmp_path):
    """Our Qwen2 with attn_impl=flex against transformers, which treats restarting position_ids as packing."""
    hf = make_hf_qwen2(tmp_path, seed=3, num_key_value_heads=2)
    ours = load_hf(str(tmp_path), attn_impl="flex").eval()
    ids, positions, cu_seqlens, _ = _packed_batch([[4, 7, 1, 3], [8, 7, 0, 0]], hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, position_ids=positions, cu_seqlens=cu_seqlens), hf(input_ids=ids, position_ids=positions).logits,
            atol=ATOL, rtol=0,
        )


def test_block_mask_is_cached_per_layout():
    a = attn.plan_attention(1, 64, torch.device("cpu"), torch.float32, _offsets([[20, 44]]), "flex")
    b = attn.plan_attention(1, 64, torch.device("cpu"), torch.float32, _offsets([[20, 44]]), "flex")
    c = attn.plan_attention(1, 64, torch.device("cpu"), torch.float32, _offsets([[30, 34]]), "flex")
    assert a.block_mask is b.block_mask and a.block_mask is not c.block_mask


def test_auto_on_cpu_is_sdpa_and_flex_refuses_cpu_training():
    cu = _offsets([[20, 44]])
    assert attn.plan_attention(1, 64, torch.device("cpu"), torch.float32, cu).backend == "sdpa"
    q, k, v = (x.requires_grad_() for x in _qkv(1, 64))
    plan = attn.plan_attention(1, 64, q.device, q.dtype, cu, "flex")
    with pytest.raises(ValueError, match="forward only on CPU"):
        attn.causal_attention(q, k, v, plan)


def test_flex_is_a_config_choice():
    cfg = BackboneConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                         attn_impl="flex")
    cfg.validate()
