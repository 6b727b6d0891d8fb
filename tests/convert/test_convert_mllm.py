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
from megadual.convert.commands import from_hf, load_source, reshard, to_hf
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

    def overrides(self, out_dir, *layout: str) -> list[str]:
        return [*layout, f"run.out_dir={out_dir}", f"loader.paths=[{self.shards}]", "train.steps=3",
                "train.save_every=2", "optim.warmup_steps=1", f"mllm.tokenizer_path={self.tokenizer}"]

    def run(self, layout: str) -> str:
        if layout not in self._runs:
            run = self.root / layout
            run_distributed(_train, world_size=2, timeout=300, args=(self.overrides(run, *LAYOUTS[layout]),))
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
    prompts = ["a red circle on the left"]
    a = generate_images(from_run, prompts, cfg_scale=3.0, temperature=1.0, seed=3)
    b = generate_images(from_export, prompts, cfg_scale=3.0, temperature=1.0, seed=3)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    images = [Image.new("RGB", (32, 32), (200, 30, 30))]
    assert caption_images(from_run, images, max_new_tokens=8) == caption_images(from_export, images, max_new_tokens=8)
    assert from_export.cfg.mllm.tokens == from_run.cfg.mllm.tokens


# ------------------------------------------------------------------------------------ back to MegaDual


def _materialise(rank, world_size, overrides):
    """Build the unified model's engine from an init checkpoint in the launched layout and save
    it as DeepSpeed would after 0 steps."""
    from megadual.config import dump_config
    from megadual.distributed.runtime import init_distributed
    from megadual.distributed.topology import Topology, plan_layout
    from megadual.train.mllm import build_mllm_engine

    cfg = load_config(os.path.join(CONFIGS, "mllm.yaml"), overrides)
    init_distributed()
    engine = build_mllm_engine(cfg, Topology(plan_layout(cfg.parallel, cfg.backbone, world_size)))
    if rank == 0:
        os.makedirs(cfg.run.out_dir, exist_ok=True)
        dump_config(cfg, os.path.join(cfg.run.out_dir, "config.yaml"))
    engine.save_checkpoint(os.path.join(cfg.run.out_dir, "checkpoints"), tag="step_000000")


def _tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(os.listdir(path)) if f.endswith(".safetensors") for k, v in load_file(os.path.join(path, f)).items()}


@pytest.mark.parametrize("layout,world_size", [(["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"], 4),
                                               (["parallel.zero_stage=3"], 2)], ids=["tp2-pp2", "dp2-zero3"])
def test_export_to_megadual_layout_to_export_is_bit_identical(layout, world_size, runs, tmp_path):
    """from-hf of an export starts every part of the unified model (visual embedding and heads
    included) in another layout; converting that back gives the same tensors, bit for bit."""
    export = runs.export("pp2")
    from_hf(export, str(tmp_path / "init"), tp=2 if "parallel.tp=2" in layout else 1)
    run = tmp_path / "run"
    overrides = runs.overrides(run, *layout, f"train.init_from={tmp_path / 'init'}")
    run_distributed(_materialise, world_size=world_size, timeout=300, args=(overrides,))
    to_hf(str(run), str(tmp_path / "again"))
    before, after = _tensors(export), _tensors(tmp_path / "again")
    assert set(before) == set(after) and any(k.startswith("megadual.pixel_head.") for k in after)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_reshard_tp2_to_tp1_resumes_with_the_same_next_step_loss(runs, tmp_path):
    """The unified model resharded at step 2 continues at tp=1 with the loss the tp=2 run logged
    at step 3 (relative 1e-5: the same fp32 sums in another order)."""
    run = runs.run("tp2")
    reshard(run, str(tmp_path / "init"), tp=1, tag="step_000002")
    resumed = tmp_path / "resumed"
    overrides = runs.overrides(resumed, "backbone.tie_embeddings=false", f"train.init_from={tmp_path / 'init'}")
    run_distributed(_train, world_size=1, timeout=300, args=(overrides,))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        step3 = [json.loads(line) for line in f][2]
    with open(resumed / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [3]
    print(f"resharded tp2 -> tp1: step-3 loss {records[0]['loss']:.6f} vs {step3['loss']:.6f}")
    for key in ("loss", "text_loss", "visual_loss", "pixel_loss", "semantic_loss"):  # None: no such target
        got, want = records[0][key], step3[key]
        assert (got is None) == (want is None) and (want is None or abs(got - want) <= 1e-5 * abs(want)), key
    assert records[0]["lr"] == pytest.approx(step3["lr"])


def test_dry_run_lists_the_export_and_writes_nothing(runs, tmp_path):
    plan = to_hf(runs.run("tp2"), str(tmp_path / "out"), dry_run=True, max_shard_size="40KB")
    assert any(": lm_head.weight (512, 64)" in line for line in plan)  # untied: its own tensor
    assert any(": megadual.semantic_head.classifier_weight (2, 128, 32)" in line for line in plan)
    assert any(line.startswith(f"{tmp_path / 'out'}/visual_tokenizer/ <- ") for line in plan)
    assert not os.listdir(tmp_path)


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




def test_unified_init_checkpoint_must_fit_the_run(tmp_path):
    from dataclasses import replace

    from megadual.train.init_checkpoint import check_compatible, open_init_checkpoint

    cfg = load_config(os.path.join(CONFIGS, "mllm.yaml"))
    DualTokenMLLM(cfg.backbone, cfg.mllm, seed=0).save_pretrained(str(tmp_path / "export"))
    from_hf(str(tmp_path / "export"), str(tmp_path / "init"), tp=1)
    ckpt = open_init_checkpoint(str(tmp_path / "init"))
    check_compatible(ckpt, cfg.backbone, 1, replace(cfg.mllm, cfg_scale=1.0))  # sampling settings may differ
    with pytest.raises(ConfigError, match="mllm.head_layers: got 2, expected 3 as in the init checkpoint"):
        check_compatible(ckpt, cfg.backbone, 1, replace(cfg.mllm, head_layers=2))
    with pytest.raises(ConfigError, match="holds a unified model"):
        check_compatible(ckpt, cfg.backbone, 1, None)  # `train-lm` cannot start from it
    with pytest.raises(ConfigError, match="convert reshard"):
        check_compatible(ckpt, cfg.backbone, 2, cfg.mllm)
