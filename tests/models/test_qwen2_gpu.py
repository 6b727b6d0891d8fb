"""flash-attn varlen against SDPA on a GPU (skipped without CUDA; run on a lent GPU machine)."""

from __future__ import annotations

import pytest
import torch

from megadual.config.schema import BackboneConfig
from megadual.models.qwen2 import build_qwen2
from megadual.models.qwen2.attention import flash_attn_available


@pytest.mark.gpu
def test_flash_varlen_matches_sdpa_packed():
    if not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    cfg = BackboneConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
    sdpa = build_qwen2(BackboneConfig(**{**cfg.__dict__, "attn_impl": "sdpa"}), seed=0).cuda().bfloat16()
    flash = build_qwen2(BackboneConfig(**{**cfg.__dict__, "attn_impl": "flash"}), seed=0).cuda().bfloat16()
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    lengths = [[20, 30, 14], [64]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).cuda()
    cu = torch.tensor([0, 20, 50, 64, 128], device="cuda")
    with torch.no_grad():
        want = sdpa(ids, positions, cu).float()
        got = flash(ids, positions, cu).float()
    # bf16 logits of O(1): both kernels round differently; 2e-2 is a few bf16 ulps.
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
