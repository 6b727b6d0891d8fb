"""megadual plan: parameter counts against published sizes, model states against DeepSpeed's own
estimators, layouts and their refusals, and one-line errors for wrong input."""

import json
import os

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from megadual.cli import main as cli_main
from megadual.config import load_config
from megadual.plan import Cluster, make_plan
from megadual.plan.memory import model_state_bytes
from megadual.plan.parts import build_meta_models, count_parts

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
QWEN_3B, QWEN_7B = os.path.join(CONFIGS, "qwen2.5-3b.yaml"), os.path.join(CONFIGS, "qwen2.5-7b.yaml")
MLLM_3B = os.path.join(CONFIGS, "dualtoken-mllm-3b.yaml")
GIB = 2**30


def _parts(path, command):
    cfg = load_config([path])
    return count_parts(cfg, command, build_meta_models(cfg, command))


@pytest.mark.parametrize("path, published", [(QWEN_3B, 3_085_938_688), (QWEN_7B, 7_615_616_512)])
def test_backbone_counts_equal_the_published_sizes(path, published):
    # Qwen2.5-3B ties its embedding (counted once: 3.09B); 7B does not (7.61B).
    assert sum(p.params for p in _parts(path, "train-lm")) == published


def test_tokenizer_tower_is_siglip_so400m():
    parts = {p.name: p for p in _parts(os.path.join(CONFIGS, "dualtoken-so400m-384.yaml"), "train-tokenizer")}
    assert parts["tower"].params == 428_225_600  # SigLIP so400m-patch14-384's vision tower, head included
    assert not parts["semantic teacher (frozen)"].trainable


@pytest.mark.parametrize("params, largest, dp", [(3_085_938_688, 311_164_928, 8), (7_615_616_512, 544_997_376, 64),
                                                  (123_457, 4_099, 3)])
def test_model_states_equal_deepspeeds_estimators(params, largest, dp):
    _, zero2 = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=dp, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=dp, cpu_offload=False,
                                                        cpu_offload_params=False)
    assert model_state_bytes(params, largest, dp, 2, "bf16").total == pytest.approx(zero2, abs=1)
    assert model_state_bytes(params, largest, dp, 3, "bf16").total == pytest.approx(zero3, abs=1)


def test_plan_model_states_of_a_layout_equal_deepspeeds_estimate():
    cfg = load_config([QWEN_3B], ["parallel.zero_stage=3"])
    plan = make_plan(cfg, Cluster(8, 8, 80 * GIB, 989, 0.45, 2 * GIB))
    memory = plan.layouts[0].memory_per_rank_bytes
    _, zero3, _ = estimate_zero3_model_states_mem_needs(plan.num_parameters, 311_164_928, num_gpus_per_node=8,
                                                        cpu_offload=False, cpu_offload_params=False)
    assert memory["parameters"] + memory["gradients"] + memory["optimizer"] == pytest.approx(zero3, abs=1)


def test_search_ranks_fitting_layouts_and_lists_refusals():
    cfg = load_config([MLLM_3B])
    plan = make_plan(cfg, Cluster(64, 8, 80 * GIB, 989, 0.45, 2 * GIB), search=True)
    fitting = [e for e in plan.layouts if e.fits]
    assert fitting and all(e.layout.tp * e.layout.pp * e.layout.dp == 64 for e in plan.layouts)
    rates = [e.tokens_per_s for e in fitting]
    assert rates == sorted(rates, reverse=True) and plan.layouts[: len(fitting)] == fitting
    reasons = {reason for _, reason in plan.refusals}
    assert any("num_kv_heads" in r for r in reasons)  # Qwen2.5-3B has 2 KV heads: tp <= 2
    assert any("span nodes" in r for r in reasons)
    assert any("zero_stage" in r and "pp=" in r for r in reasons)
    # Activation checkpointing trades time for memory, and the config's global batch holds.
    for e in plan.layouts:
        assert e.layout.dp * e.layout.micro_batch_size * e.layout.grad_accum == 4 * 64
    by_key = {(e.layout.tp, e.layout.pp, e.layout.zero_stage, e.layout.micro_batch_size,
               e.layout.activation_checkpointing): e for e in plan.layouts}
    plain, checkpointed = by_key[(1, 1, 1, 1, False)], by_key[(1, 1, 1, 1, True)]
    assert checkpointed.memory_per_rank_bytes["activations"] < plain.memory_per_rank_bytes["activations"] / 10
    assert checkpointed.step_time_s > plain.step_time_s


def test_pipeline_splits_layers_and_adds_a_bubble():
    cfg = load_config([QWEN_3B], ["parallel.pp=4", "train.grad_accum=8"])
    e = make_plan(cfg, Cluster(8, 8, 80 * GIB, 989, 0.45, 2 * GIB)).layouts[0]
    assert e.layout.pp == 4 and e.bubble == pytest.approx(3 / 11)
    single = make_plan(load_config([QWEN_3B], ["train.grad_accum=8"]), Cluster(2, 8, 80 * GIB, 989, 0.45, 0)).layouts[0]
    assert e.memory_per_rank_bytes["parameters"] < single.memory_per_rank_bytes["parameters"] / 2


def test_cli_json_and_png(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert cli_main(["plan", "-c", MLLM_3B, "--gpus", "8", "--search", "--json", "--png", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_parameters"] == sum(out["parts"].values())
    assert {"embedding", "decoder layers", "pixel depth head", "semantic depth head"} <= set(out["parts"])
    best = out["layouts"][0]
    for key in ("tp", "pp", "dp", "zero_stage", "micro_batch_size", "activation_checkpointing", "fits",
                "step_time_s", "tokens_per_s"):
        assert key in best
    assert best["memory_per_rank_bytes"]["total"] == pytest.approx(
        sum(v for k, v in best["memory_per_rank_bytes"].items() if k != "total"))
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("argv, needle", [
    (["--gpu-memory", "8GiB"], "does not fit: the smallest layout needs"),
    (["--set", "parallel.tp=0"], "parallel.tp"),
    (["--set", "parallel.tp=2", "--gpus", "3"], "--gpus 3: not a multiple of parallel.tp x parallel.pp = 2"),
    (["--gpus", "12"], "--gpus 12: not a whole number of nodes"),
    (["--gpu-memory", "lots"], "'lots' is not a size"),
])
def test_wrong_input_is_one_line(argv, needle, capsys):
    args = ["plan", "-c", QWEN_3B, "--gpus", "8", *argv]
    if "--gpus" in argv:
        args = ["plan", "-c", QWEN_3B, *argv]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("megadual: error:"), err
