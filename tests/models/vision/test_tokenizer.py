"""DualTokenizer public API: shapes and dtypes, save/load round trip, code embeddings, errors."""

import json

import pytest
import torch

from megadual.models.vision.decoder import PixelDecoder
from megadual.models.vision.discriminator import PatchDiscriminator
from megadual.models.vision.tokenizer import DualTokenizer

from .fixtures import debug_config


@pytest.fixture(scope="module")
def tokenizer():
    tok = DualTokenizer(debug_config().tokenizer, seed=0)
    tok.train()
    with torch.no_grad():  # a few training forwards: EMA codebooks move off their random start
        for i in range(3):
            tok(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1)
    return tok.eval()


def _images(n=3, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_decode_shapes_and_dtypes(tokenizer):
    pixel, semantic = tokenizer.encode(_images())
    t, r = 8 * 8, 2  # 32 px / patch 4 = 8x8 tokens; depth 2
    assert pixel.shape == semantic.shape == (3, t, r)
    assert pixel.dtype == semantic.dtype == torch.int64
    assert 0 <= int(pixel.min()) and int(pixel.max()) < 128
    images = tokenizer.decode(pixel)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0


def test_encode_never_updates_codebooks_and_keeps_the_mode(tokenizer):
    tokenizer.train()
    before = tokenizer.pixel_branch.rq.codebook.clone()
    tokenizer.encode(_images(seed=1))
    assert tokenizer.training and tokenizer.pixel_branch.rq.training
    assert torch.equal(before, tokenizer.pixel_branch.rq.codebook)
    tokenizer.eval()


def test_embed_codes_sum_to_the_quantized_vectors(tokenizer):
    images = _images(seed=2)
    pixel, semantic = tokenizer.encode(images)
    pix_emb, sem_emb = tokenizer.embed_codes(pixel, semantic)
    per_depth, _ = tokenizer.embed_codes(pixel, None, per_depth=True)
    assert pix_emb.shape == sem_emb.shape == (3, 64, 8) and per_depth.shape == (3, 64, 2, 8)
    torch.testing.assert_close(per_depth.sum(2), pix_emb, rtol=0, atol=0)
    with torch.no_grad():
        out = tokenizer(images)  # eval forward: no EMA update
    # The branch output is proj_out(quantized); the quantized vector is the codes' sum.
    torch.testing.assert_close(tokenizer.pixel_branch.proj_out(pix_emb), out.pixel.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokenizer.semantic_branch.proj_out(sem_emb), out.semantic.features, rtol=1e-5, atol=1e-5)
    assert tokenizer.embed_codes() == (None, None)


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["format"] == "megadual-dualtoken" and config["tokenizer"]["tower"]["num_layers"] == 4
    loaded = DualTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert not loaded.training
    for (k, a), b in zip(tokenizer.state_dict().items(), loaded.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    images = _images(seed=3)
    codes = tokenizer.encode(images)
    codes2 = loaded.encode(images)
    assert torch.equal(codes[0], codes2[0]) and torch.equal(codes[1], codes2[1])
    assert torch.equal(tokenizer.decode(codes[0]), loaded.decode(codes[0]))


def test_user_errors_name_the_value(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"images: expected \[B, 3, 32, 32\]"):
        tokenizer.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"pixel_codes: expected \[B, 64, R\]"):
        tokenizer.decode(torch.zeros(1, 10, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 128\)"):
        tokenizer.decode(torch.full((1, 64, 2), 128))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        DualTokenizer.from_pretrained(str(tmp_path / "nothing"))


def test_decoder_and_discriminator_shapes():
    cfg = debug_config().tokenizer
    decoder = PixelDecoder(64, cfg.decoder)
    # A 7x7 grid (not the latent size) is resized to 8x8 first, then upsampled 4x.
    assert decoder(torch.randn(2, 64, 7, 7)).shape == (2, 3, 32, 32)
    disc = PatchDiscriminator(16, 3)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    big = debug_config("tokenizer.decoder.latent_size=24", "tokenizer.decoder.ch_mult=[1,1,4,4,8]",
                       "tokenizer.tower.image_size=384", "tokenizer.tower.patch_size=14")
    assert PixelDecoder(64, big.tokenizer.decoder).image_size == 384
