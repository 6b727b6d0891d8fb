"""`DualTokenMLLM.save_pretrained` / `from_pretrained` (the export directory of
megadual/models/mllm_export.py) without any training: every tensor round-trips, the text
tokenizer travels with the weights, and directories that are not exports are refused."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megadual.config import load_config
from megadual.config.errors import ConfigError
from megadual.data.text_tokenizers import load_text_tokenizer
from megadual.models.mllm import DualTokenMLLM

from .hf_fixtures import make_hf_qwen2

MLLM_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "mllm.yaml")


def _model(*overrides) -> DualTokenMLLM:
    cfg = load_config(MLLM_CONFIG, list(overrides))
    return DualTokenMLLM(cfg.backbone, cfg.mllm, seed=0)


def _hf_text_tokenizer(path) -> str:
    """A tiny word-level Hugging Face tokenizer (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("a red blue circle star on the".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_and_load_round_trip_every_tensor(tied, tmp_path):
    model = _model(f"backbone.tie_embeddings={str(tied).lower()}")
    files = model.save_pretrained(str(tmp_path / "export"), max_shard_size="64KB")
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    loaded = DualTokenMLLM.from_pretrained(str(tmp_path / "export"))
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert (loaded.lm.lm_head.weight is loaded.lm.backbone.embed_tokens.weight) == tied
    assert not loaded.training
    stored = json.loads((tmp_path / "export" / "config.json").read_text())
    assert stored["tie_word_embeddings"] == tied and stored["megadual"]["mllm"]["text_tokenizer"] == "bytes"


def test_bf16_export_loads_as_float32_or_as_stored(tmp_path):
    model = _model()
    model.save_pretrained(str(tmp_path / "export"), dtype=torch.bfloat16)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    as_fp32 = DualTokenMLLM.from_pretrained(str(tmp_path / "export"))
    as_stored = DualTokenMLLM.from_pretrained(str(tmp_path / "export"), dtype=None)
    name = "pixel_head.classifier_weight"
    assert as_fp32.state_dict()[name].dtype == torch.float32 and as_stored.state_dict()[name].dtype == torch.bfloat16
    assert torch.equal(as_fp32.state_dict()[name], model.state_dict()[name].bfloat16().float())


def test_hf_text_tokenizer_travels_with_the_export(tmp_path):
    source = _hf_text_tokenizer(tmp_path / "text-tok")
    model = _model(f"mllm.text_tokenizer={source}")
    files = model.save_pretrained(str(tmp_path / "export"))
    assert {"text_tokenizer/tokenizer.json", "text_tokenizer/tokenizer_config.json"} <= set(files)
    loaded = DualTokenMLLM.from_pretrained(str(tmp_path / "export"))
    assert loaded.cfg.text_tokenizer == str(tmp_path / "export" / "text_tokenizer")  # resolved inside the export
    os.rename(source, tmp_path / "moved")  # the export no longer needs the original directory
    assert load_text_tokenizer(loaded.cfg.text_tokenizer).encode("a red star on blue") == [1, 2, 5, 6, 3]


def test_text_tokenizer_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of tokenizer.json"):
        _model().save_pretrained(str(tmp_path / "export"), text_tokenizer=str(tmp_path / "empty"))
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_a_plain_qwen2_directory_is_not_an_export(tmp_path):
    make_hf_qwen2(tmp_path / "qwen2")
    with pytest.raises(ValueError, match="no 'megadual' section: not a MegaDual unified-model export"):
        DualTokenMLLM.from_pretrained(str(tmp_path / "qwen2"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DualTokenMLLM.from_pretrained(str(tmp_path / "missing"))


def test_an_invalid_megadual_section_names_its_key(tmp_path):
    _model().save_pretrained(str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    config["megadual"]["mllm"]["depth"] = 0
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="megadual.mllm.depth"):
        DualTokenMLLM.from_pretrained(str(tmp_path / "export"))


def test_inference_needs_the_visual_tokenizer_in_the_export(tmp_path):
    from megadual.inference.mllm import load_for_inference

    _model().save_pretrained(str(tmp_path / "export"))
    with pytest.raises(ConfigError, match="--visual-tokenizer"):
        load_for_inference(str(tmp_path / "export"), device="cpu")
    with pytest.raises(FileNotFoundError, match="neither a stage-2 run directory"):
        load_for_inference(str(tmp_path), device="cpu")
