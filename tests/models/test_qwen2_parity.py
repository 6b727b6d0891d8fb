"""MegaDual's Qwen2 against transformers' Qwen2ForCausalLM: logits and gradients.

Tolerance: 1e-5 absolute on fp32 logits. Both sides run the same math in a possibly
different order (our RMSNorm is torch's fused op, RoPE is applied before the head
transpose), so differences are float32 rounding: ~1e-7 relative on O(1) logits.
"""

from __future__ import annotations

import pytest
import torch

from megadual.models.qwen2 import load_hf
from megadual.models.qwen2.hf_adapter import to_hf_key

from .hf_fixtures import make_hf_qwen2

ATOL = 1e-5

CONFIGS = {
    "untied-gqa": dict(tie_word_embeddings=False, num_key_value_heads=2),
    "tied-mqa": dict(tie_word_embeddings=True, num_key_value_heads=1),
    "mha-theta": dict(num_key_value_heads=4, rope_theta=1_000_000.0),
    "wide-heads": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=16),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_qwen2(path, seed=len(request.param), **CONFIGS[request.param])
    return hf, load_hf(str(path)).eval()


@pytest.mark.parametrize("batch,seq_len", [(1, 1), (3, 13), (2, 32)])
def test_logits_match(pair, batch, seq_len):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids)
    assert got.shape == (batch, seq_len, hf.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_position_offset_matches(pair):
    """Positions that do not start at 0 (continuing a sequence) rotate like transformers'."""
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 9))
    positions = torch.arange(5, 14).expand(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, position_ids=positions), hf(input_ids=ids, position_ids=positions).logits, atol=ATOL, rtol=0)


def _packed_batch(lengths_per_row, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq_len = sum(lengths_per_row[0])
    docs, positions, offsets = [], [], [0]
    for row in lengths_per_row:
        assert sum(row) == seq_len
        row_docs = [torch.randint(0, vocab, (n,), generator=g) for n in row]
        docs.append(row_docs)
        positions.append(torch.cat([torch.arange(n) for n in row]))
        offsets.extend(offsets[-1] + n for n in row)
    ids = torch.stack([torch.cat(r) for r in docs])
    return ids, torch.stack(positions), torch.tensor(offsets), docs


@pytest.mark.parametrize("rows", [[[5, 6, 2]], [[4, 7, 1, 3], [8, 7, 0, 0]]])
def test_packed_equals_each_document_alone(pair, rows):
    """No token attends across a document: a packed row's logits equal each document run alone,
    for ours and for transformers (which treats restarting position_ids as packing)."""
    hf, ours = pair
    ids, positions, cu_seqlens, docs = _packed_batch(rows, hf.config.vocab_size)
    with torch.no_grad():
        packed = ours(ids, position_ids=positions, cu_seqlens=cu_seqlens)
        hf_packed = hf(input_ids=ids, position_ids=positions).logits
        torch.testing.assert_close(packed, hf_packed, atol=ATOL, rtol=0)
        for r, row_docs in enumerate(docs):
            start = 0
            for doc in row_docs:
                if len(doc) == 0:
                    continue
                alone = ours(doc[None])[0]
                torch.testing.assert_close(packed[r, start : start + len(doc)], alone, atol=ATOL, rtol=0)
                start += len(doc)


def test_packed_differs_without_cu_seqlens(pair):
    """The packing test above can fail: without cu_seqlens the second document sees the first."""
    hf, ours = pair
    ids, positions, cu_seqlens, _ = _packed_batch([[5, 6]], hf.config.vocab_size)
    with torch.no_grad():
        packed = ours(ids, position_ids=positions, cu_seqlens=cu_seqlens)
        leaky = ours(ids, position_ids=positions)
    assert (packed[0, 5:] - leaky[0, 5:]).abs().max() > 1e-3


def test_gradients_match(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=g)
    targets = torch.randint(0, hf.config.vocab_size, (2, 11), generator=g)
    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    loss_hf = loss_of(hf(input_ids=ids).logits)
    loss_ours = loss_of(ours(ids))
    loss_hf.backward()
    loss_ours.backward()
    torch.testing.assert_close(loss_ours, loss_hf, atol=ATOL, rtol=0)
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        expected = hf_params[to_hf_key(name)].grad
        # Gradients are O(1e-2); 1e-6 absolute is still ~1e-4 relative, far below any mapping error.
        torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked == len(list(ours.parameters()))


def test_activation_checkpointing_same_gradients(pair):
    _, ours = pair
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 9))
    grads = []
    for flag in (False, True):
        ours.zero_grad(set_to_none=True)
        ours.train()
        ours.backbone.activation_checkpointing = flag
        ours(ids).square().mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    ours.backbone.activation_checkpointing = False
    ours.eval()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
