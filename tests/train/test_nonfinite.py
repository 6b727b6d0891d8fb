"""Non-finite steps (train/nonfinite.py): skipped on every rank alike, counted, and a run that
keeps producing them stops naming its last good checkpoint, which stays `latest`.

Before: a NaN loss went into the weights; the run saved NaN checkpoints, moved `latest` and
exited 0. The NaN is provoked by a forward hook that poisons one rank's logits at chosen steps.
"""

from __future__ import annotations

import json
import math
import os

import deepspeed  # noqa: F401  (imported once so forked ranks inherit it)
import pytest
import torch

from megadual.config import load_config
from megadual.train.checkpoint import load_model_state
from megadual.train.lm import train_lm
from tests._dist import RankError, run_distributed

DEBUG_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "lm.yaml")
OVERRIDES = ["data.num_samples=256", "train.seq_len=64", "train.micro_batch_size=2", "optim.warmup_steps=2"]


def _train_poisoned(rank, world_size, run_dir, overrides, poisoned_steps):
    """train_lm with rank 1's logits multiplied by nan in the forward passes of `poisoned_steps`."""
    import megadual.train.loop as loop

    install = loop.NonFiniteGuard.__init__
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1  # one forward per step (grad_accum 1)
        return output * float("nan") if calls["n"] in poisoned_steps else output

    def init(self, engine):
        install(self, engine)
        if rank == 1:
            engine.module.register_forward_hook(poison)

    loop.NonFiniteGuard.__init__ = init
    cfg = load_config(DEBUG_CONFIG, [f"run.out_dir={run_dir}", *OVERRIDES, *overrides])
    return train_lm(cfg, show_progress=False).steps_run


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.mark.parametrize("zero_stage", [0, 1], ids=["zero0-the-guard", "zero1-deepspeeds-own-check"])
def test_one_ranks_nan_step_is_skipped_by_every_rank(zero_stage, tmp_path):
    run_dir = str(tmp_path)
    overrides = ["train.steps=5", "train.save_every=1", f"parallel.zero_stage={zero_stage}"]
    assert run_distributed(_train_poisoned, world_size=2, timeout=300, args=(run_dir, overrides, {3})) == [5, 5]
    records = _records(run_dir)
    assert math.isnan(records[3]["loss"])  # the mean over ranks: one rank's nan
    assert [records[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    states = {s: load_model_state(run_dir, f"step_{s:06d}") for s in (2, 3, 4)}
    assert all(torch.isfinite(v).all() for state in states.values() for v in state.values())
    assert all(torch.equal(states[2][k], states[3][k]) for k in states[2])  # step 3 changed nothing
    assert not all(torch.equal(states[3][k], states[4][k]) for k in states[3])  # step 4 trained again


def test_a_run_that_stays_non_finite_stops_at_its_last_good_checkpoint(tmp_path):
    run_dir = str(tmp_path)
    with pytest.raises(RankError) as info:
        run_distributed(_train_poisoned, world_size=2, timeout=300,
                        args=(run_dir, ["train.steps=20", "train.save_every=4", "train.max_skipped_steps=3"],
                              set(range(6, 21))))
    message = str(info.value)
    assert "NonFiniteTrainingError" in message and "3 optimizer steps in a row" in message
    assert "step_000004" in message
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step_000004"
    assert sorted(_records(run_dir)) == list(range(1, 9))  # stopped at step 8, before its save
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "step_000008"))
    assert all(torch.isfinite(v).all() for v in load_model_state(run_dir).values())
