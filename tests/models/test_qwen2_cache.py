"""The backbone's KV cache: incremental decoding equals the full forward and transformers' greedy generate.

Tolerance: 1e-5 absolute on fp32 logits. The cached path runs the same math as the full
forward, but SDPA sees an explicit mask over S+T keys instead of `is_causal` over T, so the
reductions may be blocked differently: float32 rounding, ~1e-7 relative on O(1) logits.
"""

from __future__ import annotations

import pytest
import torch

from megadual.config.schema import BackboneConfig
from megadual.models.qwen2 import KVCache, build_qwen2, load_hf

from .hf_fixtures import make_hf_qwen2

ATOL = 1e-5
CFG = BackboneConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     rope_theta=10000.0)


@pytest.fixture(scope="module")
def model():
    return build_qwen2(CFG, seed=3).eval()


def _ids(b, t, seed=0, vocab=CFG.vocab_size):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_incremental_equals_full_forward(model):
    ids = _ids(2, 11)
    full = model(ids)
    cache = KVCache(CFG.num_layers)
    # Prefill 4, then a chunk of 3 (T > 1 against a non-empty cache), then one at a time.
    pieces = [model(ids[:, :4], kv_cache=cache), model(ids[:, 4:7], kv_cache=cache)]
    pieces += [model(ids[:, i : i + 1], kv_cache=cache) for i in range(7, 11)]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_grows_past_first_allocation(model):
    """Crossing the buffer's first capacity (64 tokens) keeps earlier keys intact."""
    ids = _ids(1, 70, seed=1)
    full = model(ids)
    cache = KVCache(CFG.num_layers)
    first = model(ids[:, :60], kv_cache=cache)
    rest = [model(ids[:, i : i + 1], kv_cache=cache) for i in range(60, 70)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(model):
    lengths, pad = [5, 8], 8
    rows = [_ids(1, n, seed=10 + n)[0] for n in lengths]
    ids = torch.full((2, pad), 0)
    mask = torch.zeros(2, pad, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, pad - len(row) :] = row
        mask[r, pad - len(row) :] = True
    steps = _ids(2, 3, seed=5)
    cache = KVCache(CFG.num_layers)
    prefill = model(ids, kv_cache=cache, attention_mask=mask)
    decoded = [model(steps[:, i : i + 1], kv_cache=cache) for i in range(3)]
    for r, row in enumerate(rows):
        alone = model(torch.cat([row, steps[r]])[None])[0]
        got = torch.cat([prefill[r, pad - len(row) :], *(d[r] for d in decoded)])
        torch.testing.assert_close(got, alone, atol=ATOL, rtol=0)


def test_bad_use_raises(model):
    ids = _ids(1, 4)
    with pytest.raises(ValueError, match="torch.no_grad"):
        model(ids, kv_cache=KVCache(CFG.num_layers))
    with torch.no_grad():
        with pytest.raises(ValueError, match="layers"):
            model(ids, kv_cache=KVCache(CFG.num_layers + 1))
        with pytest.raises(ValueError, match="cu_seqlens"):
            model(ids, kv_cache=KVCache(CFG.num_layers), cu_seqlens=torch.tensor([0, 4]))
        with pytest.raises(ValueError, match="only used with kv_cache"):
            model(ids, attention_mask=torch.ones(1, 4, dtype=torch.bool))
        cache = KVCache(CFG.num_layers)
        model(ids, kv_cache=cache)
        with pytest.raises(ValueError, match="rows"):
            model(_ids(2, 1), kv_cache=cache)


@torch.no_grad()
def _greedy(model, ids, mask, steps):
    cache = KVCache(model.cfg.num_layers)
    logits = model(ids, kv_cache=cache, attention_mask=mask)[:, -1]
    out = []
    for _ in range(steps):
        nxt = logits.argmax(-1)
        out.append(nxt)
        logits = model(nxt[:, None], kv_cache=cache)[:, -1]
    return torch.stack(out, dim=1)


def test_greedy_matches_transformers_generate(tmp_path):
    hf = make_hf_qwen2(tmp_path, seed=7)
    ours = load_hf(str(tmp_path)).eval()
    # Row 0 is left-padded by 3: transformers' generate takes the same attention_mask.
    ids = _ids(2, 9, seed=2, vocab=hf.config.vocab_size)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    ids[0, :3] = 0
    steps = 12
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                               do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)[:, 9:]
    got = _greedy(ours, ids, mask.bool(), steps)
    assert torch.equal(got, expected), (got, expected)
