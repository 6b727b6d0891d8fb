"""The three quantizer designs of the tokenizer (tokenizer.design): what each quantizes, what
`encode` returns, that decode / embed_codes read the right codebooks, and the export round trip."""

from __future__ import annotations

import os

import pytest
import torch

from megadual.config import ConfigError, load_config
from megadual.models.vision.tokenizer import DualTokenizer

from .fixtures import REPO, debug_config

DESIGNS = ["dualtoken", "tokenflow", "single"]


def _config(design):
    name = "tokenizer.yaml" if design == "dualtoken" else f"tokenizer-{design}.yaml"
    return load_config(os.path.join(REPO, "configs", "debug", name)).tokenizer


def _images(n=3, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module", params=DESIGNS)
def trained(request):
    tok = DualTokenizer(_config(request.param), seed=0).train()
    with torch.no_grad():  # a few training forwards: the EMA codebooks move off their random start
        for i in range(3):
            tok(_images(4, seed=i))
    return tok.eval()


def test_the_design_decides_the_quantizers(trained):
    names = {name for name, _ in trained.named_modules()}
    expected = {"dualtoken": {"pixel", "semantic"}, "tokenflow": {"joint"}, "single": {"single"}}[trained.design]
    assert set(trained.quantizers()) == expected
    assert ("joint_rq" in names) == (trained.design == "tokenflow")
    assert ("pixel_branch" in names) == (trained.design != "single")


def test_encode_returns_the_documented_codes(trained):
    pixel, semantic = trained.encode(_images())
    assert pixel.shape == semantic.shape == (3, 64, 2) and pixel.dtype == torch.int64
    # One index for both (tokenflow), one codebook (single); two codebooks otherwise.
    assert torch.equal(pixel, semantic) == (trained.design != "dualtoken")
    images = trained.decode(pixel)
    assert images.shape == (3, 3, 32, 32) and float(images.abs().max()) <= 1.0


def test_code_embeddings_are_what_the_decoder_and_the_semantic_tail_read(trained):
    images = _images(2, seed=7)
    with torch.no_grad():
        out = trained(images)  # eval: no codebook update
        pix_emb, sem_emb = trained.embed_codes(out.pixel.codes, out.semantic.codes)
        pixel_proj = trained.semantic_branch if trained.design == "single" else trained.pixel_branch
        torch.testing.assert_close(pixel_proj.proj_out(pix_emb), out.pixel.features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trained.semantic_branch.proj_out(sem_emb), out.semantic.features,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trained.decode(out.pixel.codes), out.reconstruction.float().clamp(-1, 1),
                                   rtol=1e-4, atol=1e-4)


def test_export_round_trip_keeps_the_design_and_its_codes(trained, tmp_path):
    trained.save_pretrained(str(tmp_path))
    loaded = DualTokenizer.from_pretrained(str(tmp_path))
    assert loaded.design == trained.design
    images = _images(2, seed=3)
    for a, b in zip(trained.encode(images), loaded.encode(images)):
        assert torch.equal(a, b)


def test_tokenflow_gradients_reach_both_projections():
    tok = DualTokenizer(_config("tokenflow"), seed=0).train()
    out = tok(_images(2))
    (out.reconstruction.square().mean() + out.pooled.square().mean()).backward()
    for branch in (tok.pixel_branch, tok.semantic_branch):
        assert branch.proj_in[1].weight.grad.abs().sum() > 0 and branch.proj_out.weight.grad.abs().sum() > 0
    assert out.pixel.commitment_loss > 0 and out.semantic.commitment_loss > 0


def test_a_tokenflow_pair_that_cannot_share_an_index_is_refused():
    with pytest.raises(ConfigError, match=r"tokenizer.pixel_quantizer.codebook_size.*128, as "
                                          r"tokenizer.semantic_quantizer.codebook_size"):
        load_config(os.path.join(REPO, "configs", "debug", "tokenizer-tokenflow.yaml"),
                    ["tokenizer.pixel_quantizer.codebook_size=64"])
    with pytest.raises(ConfigError, match="tokenizer.design"):
        debug_config("tokenizer.design=vq")


def test_codes_of_another_depth_are_refused_by_every_design(trained):
    with pytest.raises(ValueError, match=r"last dim must be the residual depth 2, got shape \[1, 64, 3\]"):
        trained.embed_codes(torch.zeros(1, 64, 3, dtype=torch.long), None)

