"""`megadual demo --quick`: every stage end to end (2-rank `deepspeed` launches, conversion to
HF, generation and captioning from the HF directory), and reuse of finished stages on rerun."""

from __future__ import annotations

import math
import os

from megadual.demo import run_demo
from megadual.demo.stages import MARKER

STAGES = ("data", "tokenizer", "tokens", "mllm", "hf", "evaluate")


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    out = str(tmp_path)
    figures = run_demo(out, quick=True)
    assert figures["reused"] == []
    report = open(figures["report"]).read()
    for heading in ("Results on held-out scenes", "## Stages", "## Tokenizer", "## Unified model"):
        assert heading in report
    for png in ("evaluate/reconstructions.png", "evaluate/generations.png", "tokenizer/loss.png", "mllm/loss.png"):
        assert os.path.isfile(os.path.join(out, png)), png
        assert f"]({png})" in report  # linked from the report, relative to it
    assert figures["tokenizer"]["ranks"] == 2 and figures["mllm"]["ranks"] == 2
    assert figures["mllm"]["last_loss"] < figures["mllm"]["first_loss"]
    assert figures["tokens"]["samples"] == 256 and figures["tokens"]["skipped"] == 0
    assert "config.json" in figures["hf"]["files"]
    ev = figures["evaluate"]
    assert ev["held_out"] == 12 and ev["reader_accuracy"] >= 0.9  # the checker reads the originals
    assert math.isfinite(ev["psnr"]) and 0 <= ev["generation_accuracy"] <= 1 and 0 <= ev["caption_accuracy"] <= 1

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

    for name in ("make_data", "train_tokenizer", "extract_tokens", "train_mllm", "export_hf", "evaluate"):
        monkeypatch.setattr(run, name, body(name))
    monkeypatch.setattr(run, "write_report", lambda out, *rest: os.path.join(out, "report.md"))
    monkeypatch.setattr(run, "QUICK", run.DemoPlan(train_images=8, held_out_images=2, tokenizer_steps=1, mllm_steps=1))
    run.run_demo(str(tmp_path), quick=True)
    assert len(calls) == 6
    calls.clear()
    monkeypatch.setattr(run, "QUICK", run.DemoPlan(train_images=8, held_out_images=2, tokenizer_steps=1, mllm_steps=2))
    run.run_demo(str(tmp_path), quick=True)
    assert calls == ["train_mllm", "export_hf", "evaluate"]
