"""Checkpoint conversion: training checkpoints of every layout -> HF, HF -> MegaDual -> HF,
resharding, and bad inputs. Training runs are forked (tests/_dist.py), never in this process.
"""

from __future__ import annotations

import json
import os
import shutil

import deepspeed  # noqa: F401  (imported once so forked ranks inherit it)
import pytest
import torch
from safetensors.torch import load_file

from megadual.config import dump_config, load_config
from megadual.convert.commands import from_hf, load_source, reshard, to_hf
from megadual.convert.training_checkpoint import CheckpointError
from megadual.models.qwen2 import Qwen2ForCausalLM
from megadual.train.lm import train_lm
from tests._dist import run_distributed
from tests.models.hf_fixtures import make_hf_qwen2

DEBUG_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "lm.yaml")


def _config(run_dir, *overrides):
    return load_config(
        DEBUG_CONFIG,
        [f"run.out_dir={run_dir}", "train.seq_len=64", "train.micro_batch_size=2", "data.num_samples=128",
         "optim.warmup_steps=1", *overrides],
    )


def _train(rank, world_size, run_dir, overrides):
    train_lm(_config(run_dir, *overrides), show_progress=False)


def _hf_tensors(path):
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2", "parallel.zero_stage=1"],
    "dp2-zero3": ["parallel.zero_stage=3"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_trained_checkpoint_to_hf_matches_megadual_logits(layout, tmp_path):
    """3 steps on 2 ranks, convert, and transformers' Qwen2 on the HF directory gives the logits
    of MegaDual's tp=1 model with the same weights. fp32 max abs diff <= 1e-5: the same math in
    a different operation order, ~1e-7 on O(1) logits."""
    from transformers import Qwen2ForCausalLM as HFQwen2

    run = tmp_path / "run"
    run_distributed(_train, world_size=2, timeout=240, args=(str(run), [*LAYOUTS[layout], "train.steps=3"]))
    files = to_hf(str(run), str(tmp_path / "hf"), max_shard_size="40KB")
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # the shard threshold was honoured
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")

    source = load_source(str(run))
    ours = Qwen2ForCausalLM(source.backbone)
    ours.load_state_dict(source.state_dict())
    hf = HFQwen2.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").float().eval()
    ids = torch.randint(0, source.backbone.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.eval()(ids) - hf(input_ids=ids, use_cache=False).logits).abs().max().item()
    assert diff <= 1e-5
    # Training moved the weights away from the seed's initialisation, so the comparison is not vacuous.
    fresh = Qwen2ForCausalLM(source.backbone, seed=0).state_dict()
    assert not torch.equal(fresh["backbone.layers.0.attn.q_proj.weight"], source.get("backbone.layers.0.attn.q_proj.weight"))


def _materialise(rank, world_size, init_dir, run_dir, overrides):
    """Load an init checkpoint into the training layout and save it as DeepSpeed would after 0 steps."""
    from megadual.distributed.runtime import init_distributed
    from megadual.distributed.topology import Topology, plan_layout
    from megadual.train.engine import build_lm_engine

    cfg = _config(run_dir, "train.steps=1", f"train.init_from={init_dir}", *overrides)
    init_distributed()
    topology = Topology(plan_layout(cfg.parallel, cfg.backbone, world_size))
    lm = build_lm_engine(cfg, topology)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    lm.engine.save_checkpoint(os.path.join(run_dir, "checkpoints"), tag="step_000000")


def test_hf_to_megadual_tp2_pp2_to_hf_is_bit_identical(tmp_path):
    hf_dir = tmp_path / "hf-in"
    make_hf_qwen2(hf_dir, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, num_hidden_layers=2, rope_theta=10000.0)
    from_hf(str(hf_dir), str(tmp_path / "init"), tp=2)
    layout = ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1", "backbone.max_position_embeddings=256",
              "backbone.rms_norm_eps=1e-6", "backbone.rope_theta=10000.0"]
    run_distributed(_materialise, world_size=4, timeout=300,
                    args=(str(tmp_path / "init"), str(tmp_path / "run"), layout))
    to_hf(str(tmp_path / "run"), str(tmp_path / "hf-out"))
    before, after = _hf_tensors(hf_dir), _hf_tensors(tmp_path / "hf-out")
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_reshard_tp2_to_tp1_resumes_with_the_same_next_step_loss(tmp_path):
    """Relative 1e-5: tp=2 and tp=1 sum the same fp32 products in a different order (~1e-7)."""
    run = tmp_path / "tp2"
    run_distributed(_train, world_size=2, timeout=240,
                    args=(str(run), ["parallel.tp=2", "train.steps=4", "train.save_every=3"]))
    with open(run / "metrics.jsonl") as f:
        step4 = [json.loads(line) for line in f][3]
    reshard(str(run), str(tmp_path / "tp1-init"), tp=1, tag="step_000003")
    resumed = tmp_path / "tp1"
    run_distributed(_train, world_size=1, timeout=240,
                    args=(str(resumed), ["train.steps=4", f"train.init_from={tmp_path / 'tp1-init'}"]))
    with open(resumed / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [4]
    assert abs(records[0]["loss"] - step4["loss"]) <= 1e-5 * step4["loss"]
    assert records[0]["lr"] == pytest.approx(step4["lr"])


def test_dry_run_writes_nothing(tmp_path):
    hf_dir = tmp_path / "hf"
    make_hf_qwen2(hf_dir)
    from_hf(str(hf_dir), str(tmp_path / "init"), tp=1)
    plan = to_hf(str(tmp_path / "init"), str(tmp_path / "out"), dry_run=True, max_shard_size="20KB")
    assert any("model.layers.1.mlp.down_proj.weight" in line for line in plan)
    assert any("shard 2" in line for line in plan)
    assert not os.path.exists(tmp_path / "out")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.yaml"):
        to_hf(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_hf(str(tmp_path / "missing"), str(tmp_path / "out"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tp2run")
    run_distributed(_train, world_size=2, timeout=240, args=(str(run), ["parallel.tp=2", "train.steps=1"]))
    return run


def test_missing_shard_and_partial_output(trained_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    os.remove(broken / "checkpoints" / "step_000001" / "mp_rank_01_model_states.pt")
    with pytest.raises(FileNotFoundError, match="mp_rank_01_model_states.pt"):
        to_hf(str(broken), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp")]


def test_mismatched_shapes(trained_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    config = (broken / "config.yaml").read_text().replace("intermediate_size: 128", "intermediate_size: 96")
    (broken / "config.yaml").write_text(config)
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape .* the run's config implies"):
        to_hf(str(broken), str(tmp_path / "out"))


def test_interrupted_write_leaves_no_output(trained_run, tmp_path, monkeypatch):
    import megadual.models.hf_directory as writers

    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    real_save = writers.save_file
    monkeypatch.setattr(writers, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        to_hf(str(trained_run), str(tmp_path / "out"), max_shard_size="40KB")
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary directory


def test_existing_output_needs_overwrite(trained_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        to_hf(str(trained_run), str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_reshard_to_a_tp_that_does_not_divide(trained_run, tmp_path):
    with pytest.raises(ValueError, match="not divisible by tp=3"):
        reshard(str(trained_run), str(tmp_path / "out"), tp=3)
