"""Stage-2 training of the unified model on DeepSpeed: the loss falls, and tp=2 / dp=2 ZeRO-3
runs of the full model (heads included) equal a single-process PyTorch reference."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import deepspeed  # noqa: F401  (imported once so forked ranks inherit it)
import pytest
import torch

from megadual.config import load_config
from megadual.data.mm_sequence import SpecialTokens
from megadual.data.packed_loader import PackedMultimodalLoader
from megadual.data.token_shards import read_manifest
from megadual.models.mllm import DualTokenMLLM
from megadual.train.mllm import train_mllm
from megadual.train.schedule import lr_at
from tests._dist import run_distributed

from .mm_fixtures import write_scene_token_shards

MLLM_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "mllm.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens")
    write_scene_token_shards(str(path), num_samples=256)
    return str(path)


def _config(run_dir, shards, *overrides):
    return load_config(MLLM_CONFIG, [f"run.out_dir={run_dir}", f"loader.paths=[{shards}]", *overrides])


def _train(rank, world_size, run_dir, shards, overrides):
    train_mllm(_config(run_dir, shards, *overrides), show_progress=False)


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_falls_on_scene_tokens(tmp_path, shards):
    run_distributed(_train, world_size=1, timeout=300, args=(str(tmp_path), shards, ["train.steps=150"]))
    records = _records(tmp_path)
    assert len(records) == 150
    assert set(records[0]) >= {"loss", "text_loss", "visual_loss", "pixel_loss", "semantic_loss", "grad_norm"}

    def mean(key, part):  # over the steps that had targets of that kind
        values = [r[key] for r in part if r[key] is not None]
        assert values, key
        return sum(values) / len(values)

    # Measured over 150 steps: total and text fall ~4-6x, the code parts ~1.6-2.3x from ln(64).
    for key, factor in (("loss", 0.5), ("text_loss", 0.5), ("visual_loss", 0.75), ("pixel_loss", 0.75),
                        ("semantic_loss", 0.75)):
        assert mean(key, records[-10:]) < factor * mean(key, records[:10]), key


def reference_losses(cfg, dp: int) -> list[float]:
    """Plain PyTorch: the same seeded model, every data-parallel rank's micro-batches."""
    model = DualTokenMLLM(cfg.backbone, cfg.mllm, seed=cfg.run.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg.optim, cfg.train.steps) / cfg.optim.lr)
    tokens = SpecialTokens(**asdict(cfg.mllm.tokens))
    loaders = [PackedMultimodalLoader(cfg.loader, tokens, rank=r, world_size=dp) for r in range(dp)]
    losses = []
    for _ in range(cfg.train.steps):
        total = 0.0
        for loader in loaders:
            for _ in range(cfg.train.grad_accum):
                loss = model(next(loader)).loss
                (loss / (cfg.train.grad_accum * dp)).backward()
                total += loss.item() / (cfg.train.grad_accum * dp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


# Relative 1e-5 over 5 steps: sharding reorders fp32 sums only (~1e-7 per step); a wrong shard
# or a missed reduction moves the loss by far more.
@pytest.mark.parametrize(
    "layout",
    [["parallel.tp=2"], ["parallel.zero_stage=3"], ["parallel.tp=2", "parallel.zero_stage=3"],
     ["parallel.pp=2", "parallel.zero_stage=1"], ["parallel.pp=2", "parallel.zero_stage=1", "backbone.tie_embeddings=false"]],
    ids=["tp2", "dp2-zero3", "tp2-zero3", "pp2", "pp2-untied"],
)
def test_parallel_layouts_match_single_process(layout, tmp_path, shards):
    overrides = [*layout, "train.steps=5", "optim.warmup_steps=2"]
    run_distributed(_train, world_size=2, timeout=300, args=(str(tmp_path), shards, overrides))
    got = [r["loss"] for r in _records(tmp_path)]
    cfg = _config(tmp_path, shards, *overrides)
    want = reference_losses(cfg, dp=2 // (cfg.parallel.tp * cfg.parallel.pp))
    print(f"max relative loss difference vs single process: {max(abs(g - w) / abs(w) for g, w in zip(got, want)):.2e}")
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert abs(g - w) <= 1e-5 * abs(w), f"step {step}: {g} vs single process {w}"


def test_bad_combination_is_refused_before_process_groups(tmp_path, shards):
    with pytest.raises(ValueError, match="loader.batch_size"):
        train_mllm(_config(tmp_path, shards, "loader.batch_size=3"), show_progress=False)
    assert not torch.distributed.is_initialized()


def _train_resume(rank, world_size, run_dir, shards, overrides):
    train_mllm(_config(run_dir, shards, *overrides), resume=True, show_progress=False)


@pytest.mark.parametrize("world_size, layout", [(1, []), (2, []), (2, ["parallel.pp=2", "parallel.zero_stage=1"])],
                         ids=["dp1", "dp2", "pp2"])
def test_resume_continues_the_same_losses(world_size, layout, tmp_path, shards):
    """Save at step 3 of 6, lose everything after it, resume: steps 4-6 (all loss parts) repeat exactly.

    With 2 data-parallel ranks each rank must get its own loader position back (they read
    different samples); a pipeline run logs the total loss only."""
    import shutil

    overrides = ["train.steps=6", "train.save_every=3", *layout]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_distributed(_train, world_size=world_size, timeout=300, args=(str(straight), shards, overrides))
    expected = _records(straight)
    shutil.copytree(straight / "checkpoints" / "step_000003", resumed / "checkpoints" / "step_000003")
    (resumed / "checkpoints" / "latest").write_text("step_000003")
    run_distributed(_train_resume, world_size=world_size, timeout=300, args=(str(resumed), shards, overrides))
    got = _records(resumed)
    keys = [k for k in ("loss", "text_loss", "visual_loss", "pixel_loss", "semantic_loss", "grad_norm")
            if expected[-1].get(k) is not None]
    assert [r["step"] for r in got] == [4, 5, 6]
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in expected[3:]]


def test_zero3_code_tables_start_from_the_tokenizer(tmp_path, shards):
    """Under ZeRO-3 the tables are partitioned when the tokenizer's codebooks are copied in:
    after one warm-up step (lr 1.5e-4) the consolidated tables are still the tokenizer's."""
    from megadual.models.vision.tokenizer import DualTokenizer
    from megadual.train.checkpoint import load_model_state

    tok_cfg = load_config(os.path.join(os.path.dirname(MLLM_CONFIG), "tokenizer.yaml"))
    tokenizer = DualTokenizer(tok_cfg.tokenizer, seed=0)
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    overrides = ["parallel.zero_stage=3", "train.steps=1", "mllm.code_init=tokenizer",
                 f"mllm.tokenizer_path={tmp_path / 'tokenizer'}"]
    run_distributed(_train, world_size=2, timeout=300, args=(str(tmp_path / "run"), shards, overrides))
    state = load_model_state(str(tmp_path / "run"))
    for name, branch in (("pixel", tokenizer.pixel_branch), ("semantic", tokenizer.semantic_branch)):
        table = state[f"visual_embed.{name}.codebook"]
        assert (table - branch.rq.codebook).abs().max() < 1e-2, name


def test_code_tables_other_than_the_shards_are_refused_at_start(tmp_path, shards):
    """Before: a larger mllm.pixel_codebook_size than the shards' trained silently."""
    from tests._dist import RankError

    manifest_size = read_manifest(shards).pixel_codebook_size
    with pytest.raises(RankError, match=rf"mllm.pixel_codebook_size: got {2 * manifest_size}, expected "
                                        rf"{manifest_size}, as in the token shards under"):
        run_distributed(_train, world_size=1, timeout=120,
                        args=(str(tmp_path), shards, [f"mllm.pixel_codebook_size={2 * manifest_size}"]))
    assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))
