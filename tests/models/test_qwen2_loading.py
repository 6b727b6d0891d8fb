"""load_hf on sharded checkpoints, key mapping round trip, and every bad input a user can hit."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megadual.config.schema import BackboneConfig
from megadual.models.qwen2 import build_qwen2, config_from_hf, config_to_hf, load_hf
from megadual.models.qwen2.hf_adapter import from_hf_key, to_hf_key

from .hf_fixtures import make_hf_qwen2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = make_hf_qwen2(path)
    return path, model


def test_sharded_safetensors_load(hf_dir, tmp_path):
    _, hf = hf_dir
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ids = torch.randint(0, hf.config.vocab_size, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(str(tmp_path))(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_dtype_and_overrides(hf_dir):
    path, _ = hf_dir
    model = load_hf(str(path), dtype=torch.bfloat16, attn_impl="sdpa")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.cfg.attn_impl == "sdpa"
    with pytest.raises(ValueError, match="num_layer"):
        load_hf(str(path), num_layer=3)


def test_key_mapping_round_trips_every_parameter():
    cfg = BackboneConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2, num_kv_heads=1)
    for name in build_qwen2(cfg).state_dict():
        hf_name = to_hf_key(name)
        assert hf_name is not None, name
        assert from_hf_key(hf_name) == name
    assert to_hf_key("backbone.layers.12.attn.q_proj.bias") == "model.layers.12.self_attn.q_proj.bias"
    assert from_hf_key("model.rotary_emb.inv_freq") is None


def test_config_round_trip():
    cfg = BackboneConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2, num_kv_heads=1,
        rope_theta=12345.0, tie_embeddings=True,
    )
    back = config_from_hf(config_to_hf(cfg), init_std=cfg.init_std)
    assert back == BackboneConfig(**{**cfg.__dict__, "head_dim": cfg.resolved_head_dim})


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(str(tmp_path / "nope"))


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(str(tmp_path))


def test_missing_weights(hf_dir, tmp_path):
    path, _ = hf_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_hf(str(tmp_path))


def test_missing_shard(hf_dir, tmp_path):
    _, hf = hf_dir
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_hf(str(tmp_path))


def test_other_architecture(hf_dir, tmp_path):
    path, _ = hf_dir
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type='llama'"):
        load_hf(str(tmp_path))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(use_sliding_window=True), "sliding"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "yarn"),
    ],
)
def test_unsupported_qwen2_features(hf_dir, change, match):
    path, _ = hf_dir
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    with pytest.raises(ValueError, match=match):
        config_from_hf(config)


def test_shape_mismatch(hf_dir, tmp_path):
    path, _ = hf_dir
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(path / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight' has shape .* config.json implies"):
        load_hf(str(tmp_path))


def test_token_id_out_of_vocab(hf_dir):
    path, hf = hf_dir
    model = load_hf(str(path))
    vocab = hf.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary"):
        model(torch.tensor([[1, 2, vocab]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))


@pytest.mark.parametrize(
    "cu,match",
    [
        ([0, 4], "end at batch"),
        ([0, 5, 3, 8], "non-decreasing"),
        ([0, 6, 16], "across a row boundary"),
    ],
)
def test_bad_cu_seqlens(hf_dir, cu, match):
    path, _ = hf_dir
    model = load_hf(str(path))
    ids = torch.zeros(2, 8, dtype=torch.long) if cu[-1] == 16 else torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        model(ids, cu_seqlens=torch.tensor(cu))
