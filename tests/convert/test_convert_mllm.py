"""Unified-model (`megadual train`) checkpoints -> export directories: every layout converts,
transformers' Qwen2 reads the backbone, `DualTokenMLLM.from_pretrained` gives the model of the
checkpoint, `load_for_inference` serves the export, and bad inputs fail clearly.

One 3-step run per layout (2 forked ranks, checkpoints at steps 2 and 3) is trained on first
use and shared by the tests of this module.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict

import deepspeed  # noqa: F401  (imported once so forked ranks inherit it)
import numpy as np
import pytest
import torch
from PIL import Image

from megadual.config import load_config
from megadual.config.errors import ConfigError
from megadual.convert.commands import load_source, reshard, to_hf
from megadual.convert.training_checkpoint import CheckpointError
from megadual.data.mm_sequence import SpecialTokens
from megadual.data.packed_loader import PackedMultimodalLoader
from megadual.inference.mllm import caption_images, generate_images, load_for_inference
from megadual.models.mllm import DualTokenMLLM
from megadual.models.vision.tokenizer import DualTokenizer
from megadual.train.mllm import train_mllm
from tests._dist import run_distributed
from tests.train.mm_fixtures import write_scene_token_shards

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug")
# tp2 unties the text head so both head kinds (own lm_head tensor / tied to the embedding) are exported.
LAYOUTS = {
    "tp2": ["parallel.tp=2", "backbone.tie_embeddings=false"],
    "pp2": ["parallel.pp=2", "parallel.zero_stage=1"],
    "dp2-zero3": ["parallel.zero_stage=3"],
}
TOLERANCE = 1e-5  # fp32: the same math in another operation order stays ~1e-7 on O(1) values


def _train(rank, world_size, overrides):
    train_mllm(load_config(os.path.join(CONFIGS, "mllm.yaml"), overrides), show_progress=False)


def _tokenizer(path, *overrides):
    cfg = load_config(os.path.join(CONFIGS, "tokenizer.yaml"), list(overrides))
    DualTokenizer(cfg.tokenizer, seed=0).save_pretrained(str(path))
    return str(path)


class Runs:
    """Trained runs and their exports, made on first use."""

    def __init__(self, root):
        self.root = root
        self.shards = str(root / "tokens")
        write_scene_token_shards(self.shards, num_samples=128)
        self.tokenizer = _tokenizer(root / "tokenizer")
        self._runs, self._exports = {}, {}

    def run(self, layout: str) -> str:
        if layout not in self._runs:
            run = self.root / layout
            overrides = [*LAYOUTS[layout], f"run.out_dir={run}", f"loader.paths=[{self.shards}]", "train.steps=3",
                         "train.save_every=2", "optim.warmup_steps=1", f"mllm.tokenizer_path={self.tokenizer}"]
            run_distributed(_train, world_size=2, timeout=300, args=(overrides,))
            self._runs[layout] = str(run)
        return self._runs[layout]

    def export(self, layout: str) -> str:
        if layout not in self._exports:
            out = str(self.root / f"{layout}-hf")
            files = to_hf(self.run(layout), out, max_shard_size="40KB")
            assert len([f for f in files if f.endswith(".safetensors") and "/" not in f]) > 1  # sharded
            self._exports[layout] = out
        return self._exports[layout]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("mllm-convert"))


def _checkpoint_model(run: str, tag=None) -> DualTokenMLLM:
    """The tp=1 model with the checkpoint's weights, merged straight from its rank files."""
    source = load_source(run, tag)
    model = DualTokenMLLM(source.backbone, source.model.mllm)
    model.load_state_dict(source.state_dict())
    return model.eval()


def _dp(layout: str) -> int:
    return 2 if layout == "dp2-zero3" else 1


def _loader(cfg, dp_rank: int, dp: int) -> PackedMultimodalLoader:
    return PackedMultimodalLoader(cfg.loader, SpecialTokens(**asdict(cfg.mllm.tokens)), rank=dp_rank, world_size=dp)


def _outputs(model: DualTokenMLLM, batch: dict) -> dict[str, torch.Tensor]:
    """Everything the unified model computes on a batch: losses, hidden states, text and code logits."""
    with torch.no_grad():
        hidden = model.hidden_states(batch["input_ids"], batch["pixel_codes"], batch["semantic_codes"],
                                     batch["modality_mask"], batch["position_ids"], batch["cu_seqlens"])
        visual = batch["pixel_labels"][..., 0] != -100
        out = {f"loss.{k}": v for k, v in model(batch)._asdict().items()}
        out["hidden"] = hidden
        out["text_logits"] = model.text_logits(hidden)
        out["pixel_logits"] = model.pixel_head(hidden[visual], batch["pixel_labels"][visual])
        out["semantic_logits"] = model.semantic_head(hidden[visual], batch["semantic_labels"][visual])
        out["image_codes"] = torch.cat(model.generate_image_codes([[97, 98]], num_positions=4, temperature=0.0), -1)
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_export_matches_transformers_and_the_checkpoint(layout, runs):
    from transformers import Qwen2ForCausalLM as HFQwen2

    run, export = runs.run(layout), runs.export(layout)
    reference = _checkpoint_model(run)
    fresh = DualTokenMLLM(reference.backbone_cfg, reference.cfg, seed=0).state_dict()
    for name in ("lm.backbone.layers.0.attn.q_proj.weight", "visual_embed.pixel.codebook", "semantic_head.classifier_weight"):
        assert not torch.equal(fresh[name], reference.state_dict()[name]), f"{name} never trained: a vacuous comparison"

    # transformers loads the backbone and only reports the MegaDual tensors as unexpected.
    hf, info = HFQwen2.from_pretrained(export, attn_implementation="sdpa", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(k.startswith("megadual.") for k in info["unexpected_keys"])
    ids = torch.randint(0, reference.backbone_cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_diff = (hf.float().eval()(input_ids=ids, use_cache=False).logits - reference.lm(ids)).abs().max().item()

    # The whole model, through from_pretrained, on a packed multimodal batch and in generation.
    loaded = DualTokenMLLM.from_pretrained(export)
    assert loaded.cfg.tokenizer_path == os.path.join(export, "visual_tokenizer")
    batch = next(_loader(load_config(os.path.join(run, "config.yaml")), 0, 1))
    assert batch["modality_mask"].any()
    got, want = _outputs(loaded, batch), _outputs(reference, batch)
    full_diff = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    print(f"{layout}: transformers Qwen2 vs MegaDual logits max abs diff {hf_diff:.2e}; "
          f"from_pretrained vs checkpoint max abs diff {full_diff:.2e}")
    assert hf_diff <= TOLERANCE
    assert full_diff <= TOLERANCE


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_merged_checkpoint_reproduces_the_next_logged_loss(layout, runs):
    """An anchor outside the converter: the step-2 checkpoint, merged to tp=1, gives on step 3's
    batches the loss the distributed run logged at step 3 (relative 1e-5, as the layout parity tests)."""
    run = runs.run(layout)
    cfg = load_config(os.path.join(run, "config.yaml"))
    model = _checkpoint_model(run, tag="step_000002")
    dp, accum = _dp(layout), cfg.train.grad_accum
    losses = []
    for rank in range(dp):
        loader = _loader(cfg, rank, dp)
        batches = [next(loader) for _ in range(3 * accum)][2 * accum:]  # step 3's micro-batches
        with torch.no_grad():
            losses += [model(b).loss.item() for b in batches]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f][2]["loss"]
    want = sum(losses) / len(losses)
    print(f"{layout}: logged step-3 loss {logged:.6f}, merged step-2 checkpoint {want:.6f} "
          f"(relative diff {abs(want - logged) / abs(logged):.1e})")
    assert abs(want - logged) <= 1e-5 * abs(logged)


def test_export_serves_generate_and_caption_like_the_run(runs):
    """The demo's path: load_for_inference(export) then generate_images / caption_images gives
    what the run directory gives (ZeRO-3 at tp=1 is a layout the run directory loads too)."""
    run, export = runs.run("dp2-zero3"), runs.export("dp2-zero3")
    from_run, from_export = load_for_inference(run, device="cpu"), load_for_inference(export, device="cpu")
    prompts = ["a small red circle at the top on a blue background"]
    a = generate_images(from_run, prompts, cfg_scale=3.0, temperature=1.0, seed=3)
    b = generate_images(from_export, prompts, cfg_scale=3.0, temperature=1.0, seed=3)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    images = [Image.new("RGB", (32, 32), (200, 30, 30))]
    assert caption_images(from_run, images, max_new_tokens=8) == caption_images(from_export, images, max_new_tokens=8)
    assert from_export.cfg.mllm.tokens == from_run.cfg.mllm.tokens


# ------------------------------------------------------------------------------------ bad inputs


def test_export_with_a_missing_shard(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs.export("tp2"), broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        DualTokenMLLM.from_pretrained(str(broken))


def test_export_whose_config_does_not_fit_its_weights(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs.export("tp2"), broken)
    config = json.loads((broken / "config.json").read_text())
    config["megadual"]["mllm"]["head_width"] = 64
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'megadual\.pixel_head\.[\w.]+' has shape .* config.json implies"):
        DualTokenMLLM.from_pretrained(str(broken))


def test_to_hf_with_a_missing_or_mismatched_visual_tokenizer_writes_nothing(runs, tmp_path):
    run = runs.run("tp2")
    with pytest.raises(FileNotFoundError, match="--visual-tokenizer"):
        to_hf(run, str(tmp_path / "out"), visual_tokenizer=str(tmp_path / "nowhere"))
    other = _tokenizer(tmp_path / "depth3", "tokenizer.pixel_quantizer.depth=3", "tokenizer.semantic_quantizer.depth=3")
    with pytest.raises(ConfigError, match="mllm.depth: got 2, expected 3, as in the visual tokenizer"):
        to_hf(run, str(tmp_path / "out"), visual_tokenizer=other)
    assert sorted(os.listdir(tmp_path)) == ["depth3"]  # neither the output nor a temporary directory


def test_reshard_of_a_unified_model_run_is_refused(runs, tmp_path):
    with pytest.raises(CheckpointError, match="convert to-hf"):
        reshard(runs.run("tp2"), str(tmp_path / "out"), tp=1)
    assert not os.path.exists(tmp_path / "out")
