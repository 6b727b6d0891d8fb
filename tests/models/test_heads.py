"""Depth-transformer heads: shapes, causality over depth, incremental decoding == teacher forcing.

Tolerance 1e-5 absolute on fp32 logits: incremental decoding runs the same math one depth
at a time (attention over the cached depths instead of a causal mask over all R), so only
the reduction order differs; differences are float32 rounding (~1e-7 relative).
"""

from __future__ import annotations

import pytest
import torch

from megadual.models.heads import DepthHead

ATOL = 1e-5
N, D, K, R, W = 5, 24, 37, 4, 16


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    # init_std 0.2 so the logits vary visibly with their inputs (0.02 leaves them near flat).
    return DepthHead(hidden_size=D, codebook_size=K, depth=R, width=W, num_layers=3, num_heads=2, init_std=0.2).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randint(0, K, (N, R), generator=g)


def test_shapes_and_depth_causality(head):
    hidden, codes = _inputs()
    logits = head(hidden, codes)
    assert logits.shape == (N, R, K)
    # Depth d sees only codes < d: changing the code at depth 2 leaves depths 0..2 unchanged
    # and changes depth 3.
    changed = codes.clone()
    changed[:, 2] = (changed[:, 2] + 1) % K
    other = head(hidden, changed)
    torch.testing.assert_close(other[:, :3], logits[:, :3], atol=ATOL, rtol=0)
    assert (other[:, 3] - logits[:, 3]).abs().max() > 1e-3
    # The hidden state reaches every depth (through attention to depth 1).
    assert (head(hidden + 1.0, codes) - logits).abs().amax(dim=(0, 2)).min() > 1e-3


def test_incremental_equals_teacher_forced(head):
    hidden, codes = _inputs(2)
    with torch.no_grad():
        expected = head(hidden, codes)
        state = head.start(hidden)
        got = [head.step(state, None)] + [head.step(state, codes[:, d - 1]) for d in range(1, R)]
    torch.testing.assert_close(torch.stack(got, dim=1), expected, atol=ATOL, rtol=0)


def test_generate_greedy_is_argmax_of_teacher_forced(head):
    hidden, _ = _inputs(3)
    with torch.no_grad():
        codes = head.generate(hidden, lambda logits, d: logits.argmax(-1))
        assert codes.shape == (N, R)
        assert torch.equal(head(hidden, codes).argmax(-1), codes)


def test_gradients_reach_every_part(head):
    hidden, codes = _inputs(4)
    hidden.requires_grad_(True)
    head.zero_grad()
    torch.nn.functional.cross_entropy(head(hidden, codes).flatten(0, 1), codes.flatten()).backward()
    assert hidden.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_misuse_raises(head):
    hidden, codes = _inputs()
    with pytest.raises(ValueError, match="depth=4"):
        head(hidden, codes[:, :2])
    state = head.start(hidden)
    with pytest.raises(ValueError, match="prev_codes"):
        head.step(state, codes[:, 0])
    head.step(state)
    with pytest.raises(ValueError, match="prev_codes"):
        head.step(state)
    for d in range(1, R):
        head.step(state, codes[:, d - 1])
    with pytest.raises(ValueError, match="all 4 depths"):
        head.step(state, codes[:, -1])
    with pytest.raises(ValueError, match="multiple"):
        DepthHead(hidden_size=D, codebook_size=K, depth=R, width=10, num_heads=4)
