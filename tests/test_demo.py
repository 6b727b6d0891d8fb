"""`megadual demo --quick`: the embedded run end to end (2 ranks from the `deepspeed`
launcher), and reuse of finished stages on rerun."""

from __future__ import annotations

import os

from megadual.demo import run_demo


def test_quick_demo_runs_and_reuses_finished_stages(tmp_path):
    figures = run_demo(str(tmp_path), quick=True)
    report = open(figures["report"]).read()
    assert "held-out prefix completion" in report and "2 ranks" in report
    assert figures["last_loss"] < figures["first_loss"]
    checkpoint = tmp_path / "lm" / "checkpoints" / "step_000030"
    written = os.path.getmtime(checkpoint)

    again = run_demo(str(tmp_path), quick=True)
    assert os.path.getmtime(checkpoint) == written  # training was not redone
    assert again["last_loss"] == figures["last_loss"]
