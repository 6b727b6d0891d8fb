"""Data-parallel replicas are checked for drift: identical copies pass, one corrupted buffer
on one rank stops every rank with a message naming the tensor and the rank; real 2-rank
training (ZeRO-0 and ZeRO-1 backbone, the tokenizer's EMA codebooks) passes a check every step."""

import os

import deepspeed  # noqa: F401  (imported once here so the forked ranks inherit it)
import pytest
import torch
from torch import nn

from megadual.config import load_config
from megadual.train.lm import train_lm
from megadual.train.replicas import ReplicaDriftError, check_replicas, fingerprint
from tests._dist import run_distributed

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug")


def test_fingerprint_sees_a_changed_value_and_a_moved_one():
    x = torch.randn(64, 8)
    assert fingerprint(x) == fingerprint(x.clone())
    y = x.clone()
    y[3, 2] = torch.nextafter(y[3, 2], torch.tensor(float("inf")))  # one ulp
    assert fingerprint(y) != fingerprint(x)
    assert fingerprint(x.flip(0)) != fingerprint(x)


class _Quantizer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 4)
        self.register_buffer("codebook", torch.randn(16, 4))


def _check(rank, world_size, corrupt_rank):
    model = _Quantizer()
    if rank == corrupt_rank:
        model.codebook[5, 1] += 1e-3
    try:
        check_replicas(model, zero_stage=1, step=7)
    except ReplicaDriftError as e:
        return str(e)
    return None


def test_identical_replicas_pass():
    assert run_distributed(_check, world_size=2, args=(None,)) == [None, None]


def test_a_corrupted_buffer_on_one_rank_is_named_on_every_rank():
    messages = run_distributed(_check, world_size=2, args=(1,))
    assert messages[0] == messages[1] and messages[0] is not None
    assert "at step 7: buffer codebook (rank(s) 1 differ from rank 0)" in messages[0]
    assert "parameter proj.weight" not in messages[0]


def _train(rank, world_size, run_dir, overrides):
    train_lm(load_config([os.path.join(CONFIGS, "lm.yaml")],
                         [f"run.out_dir={run_dir}", "train.steps=3", "train.seq_len=64", "data.num_samples=128",
                          "train.replica_check_every=1", *overrides]), show_progress=False)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_real_data_parallel_training_passes_a_check_every_step(zero_stage, tmp_path):
    run_distributed(_train, world_size=2, args=(str(tmp_path), [f"parallel.zero_stage={zero_stage}"]), timeout=300)
    assert os.path.exists(tmp_path / "checkpoints" / "latest")
