"""Backbone training on DeepSpeed, 2 gloo ranks, against a single-process PyTorch reference.

Each layout trains 5 optimizer steps of the debug backbone; the reference builds the same
model (same seed: block-seeded initialisation makes every layout start from identical
weights), feeds it the union of the data-parallel ranks' batches with plain torch AdamW, and
must log the same losses. Tolerance: relative 1e-5. Sharding changes only the order of fp32
sums (tp all-reduces, dp gradient averaging, ZeRO's flat partitions): ~1e-7 relative per step,
growing slowly over 5 steps; 1e-5 leaves headroom for that and still catches any real error
(a wrong shard, a missed gradient reduction or a skipped step moves the loss by >= 1e-3).
"""

from __future__ import annotations

import json
import os
import shutil

import deepspeed  # noqa: F401  (imported once here so the forked ranks inherit it)
import pytest
import torch

from megadual.config import load_config
from megadual.data.text_lm import PackedTextLoader, load_documents
from megadual.models.qwen2 import build_qwen2
from megadual.train.engine import lm_loss
from megadual.train.lm import train_lm
from megadual.train.schedule import lr_at
from tests._dist import run_distributed

DEBUG_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "lm.yaml")
STEPS = 5
RTOL = 1e-5


# The debug backbone's run in every layout test (also the multi-node and SLURM ones).
SETTINGS = [f"train.steps={STEPS}", "train.seq_len=64", "train.micro_batch_size=2", "train.grad_accum=2",
            "data.num_samples=256", "optim.warmup_steps=2"]


def _config(run_dir, *overrides):
    return load_config(DEBUG_CONFIG, [f"run.out_dir={run_dir}", *SETTINGS, *overrides])


def _read_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _train_rank(rank, world_size, run_dir, overrides):
    train_lm(_config(run_dir, *overrides), show_progress=False)
    return _read_losses(run_dir) if rank == 0 else None


def reference_losses(cfg, dp: int) -> list[float]:
    """Plain PyTorch: one model, every data-parallel rank's micro-batches, mean loss."""
    model = build_qwen2(cfg.backbone, seed=cfg.run.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg.optim, cfg.train.steps) / cfg.optim.lr)
    docs = load_documents(cfg.data, cfg.run.seed)
    loaders = [
        PackedTextLoader(docs, cfg.train.seq_len, cfg.train.micro_batch_size, seed=cfg.run.seed, rank=r, world_size=dp)
        for r in range(dp)
    ]
    losses = []
    for _ in range(cfg.train.steps):
        total = 0.0
        for loader in loaders:
            for _ in range(cfg.train.grad_accum):
                b = next(loader)
                loss = lm_loss(model(b["input_ids"], b["position_ids"], b["cu_seqlens"]), b["labels"])
                (loss / (cfg.train.grad_accum * dp)).backward()
                total += loss.item() / (cfg.train.grad_accum * dp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


# name -> (ranks, overrides)
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-zero3": (2, ["parallel.tp=2", "parallel.zero_stage=3"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "pp2-untied": (2, ["parallel.pp=2", "parallel.zero_stage=1", "backbone.tie_embeddings=false"]),
    "pp2-tied": (2, ["parallel.pp=2", "parallel.zero_stage=1", "backbone.tie_embeddings=true"]),
    # 4 ranks on 2 cores: slower, but the only way to see tp inside pipeline stages.
    "pp2-tp2-ckpt": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.zero_stage=1",
                         "train.activation_checkpointing=true"]),
    "dp2-ckpt": (2, ["parallel.zero_stage=1", "train.activation_checkpointing=true"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, tmp_path):
    ranks, overrides = LAYOUTS[layout]
    got = run_distributed(_train_rank, world_size=ranks, timeout=300, args=(str(tmp_path), overrides))[0]
    cfg = _config(tmp_path, *overrides)
    dp = ranks // (cfg.parallel.tp * cfg.parallel.pp)
    want = reference_losses(cfg, dp)
    assert len(got) == STEPS
    print(f"max relative loss difference vs single process: {max(abs(g - w) / abs(w) for g, w in zip(got, want)):.2e}")
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert abs(g - w) <= RTOL * abs(w), f"step {step}: {layout} loss {g} vs single process {w}"
    assert got[-1] < got[0]


def _train_resume_rank(rank, world_size, run_dir, overrides):
    train_lm(_config(run_dir, *overrides), resume=True, show_progress=False)


@pytest.mark.parametrize("layout", ["tp2-zero3", "pp2-tied", "dp2-zero3"])
def test_resume_after_kill_equals_uninterrupted(layout, tmp_path):
    """Save at step 3 of 6, lose everything after it, resume: steps 4-6 are the uninterrupted ones."""
    ranks, layout_overrides = LAYOUTS[layout]
    overrides = [*layout_overrides, "train.save_every=3", "train.steps=6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_distributed(_train_rank, world_size=ranks, timeout=240, args=(str(straight), overrides))
    expected = _read_losses(straight)

    shutil.copytree(straight / "checkpoints" / "step_000003", resumed / "checkpoints" / "step_000003")
    (resumed / "checkpoints" / "latest").write_text("step_000003")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": x}) + "\n" for i, x in enumerate(expected[:3])))
    run_distributed(_train_resume_rank, world_size=ranks, timeout=240, args=(str(resumed), overrides))
    assert _read_losses(resumed) == expected
