"""The unified trainer on one GPU (skipped without CUDA): a bf16 step close to fp32, and a
DeepSpeed ZeRO-3 step over NCCL in a world of one.

The runs share one process group in this process (DeepSpeed keeps its communicator for
the life of the process), created from launcher-style variables for a world of one.
Tolerances: bf16 carries ~3 significant digits and the loss sums many rounded products,
so bf16 losses are compared with fp32 at 3% relative; ZeRO-3 against ZeRO-0 in fp32
differs only in reduction order and partitioned flattening, 1e-4 relative.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megadual.config import load_config
from megadual.distributed.runtime import free_port
from megadual.train.mllm import train_mllm

from .mm_fixtures import write_scene_token_shards

pytestmark = pytest.mark.gpu
MLLM_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug", "mllm.yaml")
STEPS = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens")
    write_scene_token_shards(str(path), num_samples=64)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield


def _losses(tmp_path, shards, *overrides) -> list[float]:
    run_dir = tmp_path / "_".join(o.replace("=", "-").replace(".", "-") for o in overrides)
    cfg = load_config(MLLM_CONFIG, [f"run.out_dir={run_dir}", f"loader.paths=[{shards}]", f"train.steps={STEPS}",
                                    *overrides])
    train_mllm(cfg, show_progress=False)
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def _max_relative(a, b) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_bf16_step_close_to_fp32(tmp_path, shards):
    fp32 = _losses(tmp_path, shards, "train.dtype=fp32")
    bf16 = _losses(tmp_path, shards, "train.dtype=bf16")
    assert torch.distributed.get_backend() == "nccl"
    assert len(bf16) == len(fp32) == STEPS
    assert _max_relative(bf16, fp32) < 3e-2, (bf16, fp32)


def test_zero3_step_over_nccl_equals_zero0(tmp_path, shards):
    zero0 = _losses(tmp_path, shards, "parallel.zero_stage=0")
    zero3 = _losses(tmp_path, shards, "parallel.zero_stage=3")
    assert torch.distributed.get_backend() == "nccl"
    assert _max_relative(zero3, zero0) < 1e-4, (zero3, zero0)
