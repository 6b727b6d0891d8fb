"""Visual input embedding: shapes, the per-branch split, sums over depth, codebook initialisation."""

from __future__ import annotations

import pytest
import torch

from megadual.config.schema import MLLMConfig, SpecialTokensConfig
from megadual.models.visual_embedding import VisualEmbedding

D, R, KP, KS, C = 20, 3, 11, 13, 6
TOKENS = SpecialTokensConfig(image_start_id=1, image_end_id=2, eos_id=3, pad_id=0)


def _cfg(**kw):
    base = dict(tokens=TOKENS, pixel_codebook_size=KP, semantic_codebook_size=KS, depth=R, code_embed_dim=C,
                init_std=0.3)
    base.update(kw)
    return MLLMConfig(**base)


@pytest.fixture
def embed():
    torch.manual_seed(0)
    return VisualEmbedding(_cfg(pixel_embed_dim=8), D)


def _codes(shape, k, seed):
    return torch.randint(0, k, (*shape, R), generator=torch.Generator().manual_seed(seed))


def test_shape_and_branch_split(embed):
    pix, sem = _codes((2, 5), KP, 0), _codes((2, 5), KS, 1)
    out = embed(pix, sem)
    assert out.shape == (2, 5, D)
    # [pixel (8) | semantic (12)]: each half depends on its own codes only.
    other = embed(pix, _codes((2, 5), KS, 2))
    torch.testing.assert_close(other[..., :8], out[..., :8], atol=0, rtol=0)
    assert (other[..., 8:] - out[..., 8:]).abs().max() > 1e-4
    other = embed(_codes((2, 5), KP, 3), sem)
    torch.testing.assert_close(other[..., 8:], out[..., 8:], atol=0, rtol=0)
    assert (other[..., :8] - out[..., :8]).abs().max() > 1e-4
    # No visual position at all (a text-only prompt): an empty [0, D], not an error.
    assert embed(_codes((0,), KP, 4), _codes((0,), KS, 5)).shape == (0, D)


def test_sum_over_depth_with_one_shared_table(embed):
    pix, sem = _codes((7,), KP, 4), _codes((7,), KS, 5)
    out = embed(pix, sem)
    # One table shared by all depths and a sum: the depth order does not matter...
    torch.testing.assert_close(embed(pix.flip(-1), sem.flip(-1)), out, atol=1e-6, rtol=0)
    # ...and the branch output is the MLP of the summed table rows.
    summed = embed.pixel.codebook[pix].sum(dim=1)
    expected = embed.pixel.fc2(torch.nn.functional.gelu(embed.pixel.fc1(summed)))
    torch.testing.assert_close(out[:, :8], expected, atol=1e-6, rtol=0)


def test_default_split_is_half(embed):
    assert VisualEmbedding(_cfg(), D)(_codes((1,), KP, 0), _codes((1,), KS, 0)).shape == (1, D)
    e = VisualEmbedding(_cfg(projector_hidden=5), D)
    assert e.pixel.fc2.out_features == D // 2 and e.semantic.fc2.out_features == D - D // 2
    assert e.pixel.fc1.out_features == 5


def test_init_from_codebooks(embed):
    g = torch.Generator().manual_seed(9)
    pixel_book, semantic_book = torch.randn(KP, C, generator=g), torch.randn(KS, 4, generator=g)
    proj = torch.randn(C, 4, generator=g)  # a tokenizer-side projection 4 -> C
    embed.init_from_codebooks_(pixel_book, semantic_book, semantic_projection=lambda cb: cb @ proj.T)
    assert torch.equal(embed.pixel.codebook.detach(), pixel_book)
    torch.testing.assert_close(embed.semantic.codebook.detach(), semantic_book @ proj.T)
    with pytest.raises(ValueError, match="code_embed_dim"):
        embed.init_from_codebooks_(pixel_book, semantic_book)  # semantic is [K, 4], the table [K, 6]


def test_bad_codes_raise(embed):
    pix, sem = _codes((2,), KP, 0), _codes((2,), KS, 0)
    with pytest.raises(ValueError, match="pixel_codebook_size"):
        embed(pix + KP, sem)
    with pytest.raises(ValueError, match="semantic_codes holds code -1"):
        embed(pix, sem - sem - 1)
    with pytest.raises(ValueError, match="depth=3"):
        embed(pix[:, :2], sem[:, :2])
    with pytest.raises(ValueError, match="pixel_embed_dim"):
        VisualEmbedding(_cfg(pixel_embed_dim=D), D)
