"""`megadual demo --quick`: every stage end to end (2-rank `deepspeed` launches, conversion to
HF, generation and captioning from the HF directory), and reuse of finished stages on rerun."""

from __future__ import annotations

import json
import math
import os

from megadual.demo import run_demo
from megadual.demo.stages import MARKER

STAGES = ("data", "teacher", "tokenizer", "tokens", "probe", "mllm", "hf", "evaluate", "curve")


def _fractions(scores: dict) -> list[float]:
    return [scores[k] for k in ("both", "shape", "colour", "unseen_combinations_both")]


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    out = str(tmp_path)
    figures = run_demo(out, quick=True)
    assert figures["reused"] == []
    report = open(figures["report"]).read()
    for heading in ("Results on held-out scenes", "## Stages", "## Tokenizer", "## Unified model"):
        assert heading in report
    for png in ("evaluate/reconstructions.png", "evaluate/generations.png", "tokenizer/loss.png", "mllm/loss.png",
                "curve.png"):
        assert os.path.isfile(os.path.join(out, png)), png
        assert f"]({png})" in report  # linked from the report, relative to it
    assert figures["tokenizer"]["ranks"] == 2 and figures["mllm"]["ranks"] == 2
    assert figures["mllm"]["last_loss"] < figures["mllm"]["first_loss"]
    assert figures["tokens"]["samples"] == 256 and figures["tokens"]["skipped"] == 0
    assert "config.json" in figures["hf"]["files"]
    ev = figures["evaluate"]
    assert ev["held_out"] == 12 and ev["reader"]["both"] == 1.0  # the checker reads the originals

    results = json.loads(open(os.path.join(out, "report.json")).read())
    assert set(results["stages"]) == set(STAGES) and results["wall_time_s"] == sum(results["stages"].values())
    assert math.isfinite(results["tokenizer"]["psnr"]) and 0 <= results["tokenizer"]["ssim"] <= 1
    for task in ("caption", "generation"):
        assert all(0 <= x <= 1 for x in _fractions(results[task]))
        assert results[task]["num"] == 12
    assert results["chance"]["shape"] == 1 / 6 and results["chance"]["colour"] == 1 / 6
    for attribute in ("shape", "colour"):
        for branch in ("pixel", "semantic", "both"):
            cell = results["probe"][attribute][branch]
            assert 0 <= cell["linear"] <= 1 and 0 <= cell["conv"] <= 1
    # Four points on the learning curve: three earlier checkpoints, then the exported model.
    assert [p["step"] for p in results["curve"]] == [5, 10, 15, 20]
    assert all(p[task]["num"] == 12 for p in results["curve"] for task in ("caption", "generation"))

    markers = {s: os.path.getmtime(os.path.join(out, s, MARKER)) for s in STAGES}
    again = run_demo(out, quick=True)
    assert again["reused"] == list(STAGES)
    assert {s: os.path.getmtime(os.path.join(out, s, MARKER)) for s in STAGES} == markers  # nothing redone
    assert again["evaluate"] == ev


def test_a_plan_change_redoes_only_the_stages_it_touches(tmp_path, monkeypatch):
    """More unified-model steps redo that stage and what reads it, not the data or the tokenizer."""
    from megadual.demo import run

    calls = []

    def body(name):
        def work(*args):
            calls.append(name)
            return {}
        return work

    names = ("make_data", "pretrain_teacher", "train_tokenizer", "extract_tokens", "probe", "train_mllm", "export_hf", "evaluate",
             "learning_curve")
    for name in names:
        monkeypatch.setattr(run, name, body(name))
    monkeypatch.setattr(run, "write_report", lambda out, *rest: os.path.join(out, "report.md"))
    plan = dict(train_images=8, held_out_images=2, teacher_steps=1, tokenizer_steps=1, probe_steps=1)
    monkeypatch.setattr(run, "QUICK", run.DemoPlan(**plan, mllm_steps=1))
    run.run_demo(str(tmp_path), quick=True)
    assert calls == list(names)
    calls.clear()
    monkeypatch.setattr(run, "QUICK", run.DemoPlan(**plan, mllm_steps=2))
    run.run_demo(str(tmp_path), quick=True)
    assert calls == ["train_mllm", "export_hf", "evaluate", "learning_curve"]
