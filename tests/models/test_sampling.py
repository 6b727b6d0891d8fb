"""Classifier-free guidance and logit filtering on known logits."""

from __future__ import annotations

import pytest
import torch

from megadual.models.sampling import apply_cfg, filter_logits, sample_logits

NEG = float("-inf")


def test_cfg_formula_on_known_logits():
    cond = torch.tensor([[2.0, 0.0, -1.0]])
    uncond = torch.tensor([[1.0, 1.0, 1.0]])
    # uncond + 3 * (cond - uncond) = [1 + 3, 1 - 3, 1 - 6]
    assert torch.equal(apply_cfg(cond, uncond, 3.0), torch.tensor([[4.0, -2.0, -5.0]]))
    # Scale 1 is the plain conditional distribution, scale 0 the unconditional one.
    assert torch.equal(apply_cfg(cond, uncond, 1.0), cond)
    assert torch.equal(apply_cfg(cond, uncond, 0.0), uncond)
    with pytest.raises(ValueError, match="one shape"):
        apply_cfg(cond, uncond[:, :2], 3.0)


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.equal(filter_logits(logits, top_k=2), torch.tensor([[3.0, NEG, 2.0, NEG]]))
    # probs of [3, 2, 1, 0] sorted: 0.644, 0.237, 0.087, 0.032. top_p 0.8: 0.644 < 0.8, so the
    # second is kept; 0.881 >= 0.8, so the third and fourth go.
    assert torch.equal(filter_logits(logits, top_p=0.8), torch.tensor([[3.0, NEG, 2.0, NEG]]))
    # The most likely choice always survives, however small top_p is.
    assert torch.equal(filter_logits(logits, top_p=0.01), torch.tensor([[3.0, NEG, NEG, NEG]]))
    assert torch.equal(filter_logits(logits), logits)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=-1)


def test_sample_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 1.0]])
    assert sample_logits(logits, temperature=0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    # top_k=1 leaves one choice: sampling must return the argmax whatever the draw.
    assert sample_logits(logits, temperature=2.0, top_k=1, generator=g).tolist() == [1, 0]
    draws = torch.stack([sample_logits(logits, 1.0, generator=g) for _ in range(400)])
    assert set(draws[:, 1].tolist()) == {0, 1, 2}  # temperature 1 without filters reaches every choice
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(logits, temperature=-1.0)
