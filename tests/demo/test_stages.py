"""The demo's stage runner: reuse when finished with the same inputs, redo otherwise."""

from __future__ import annotations

import json
import os

import pytest

from megadual.demo.stages import MARKER, StageRunner


class Work:
    """A stage body that counts its calls and writes one file."""

    def __init__(self, value, fail=False):
        self.value, self.fail, self.calls = value, fail, 0

    def __call__(self, directory):
        self.calls += 1
        with open(os.path.join(directory, "out.txt"), "w") as f:
            f.write(str(self.value))
        if self.fail:
            raise RuntimeError("stage crashed")
        return {"value": self.value}


def test_finished_stage_is_reused_without_work(tmp_path):
    first = Work(1)
    a = StageRunner(str(tmp_path)).run("a", "A", {"n": 1}, [], first)
    assert first.calls == 1 and not a.reused and a.figures == {"value": 1}
    again = Work(2)
    b = StageRunner(str(tmp_path)).run("a", "A", {"n": 1}, [], again)
    assert again.calls == 0 and b.reused and b.figures == {"value": 1} and b.seconds == a.seconds


def test_other_settings_upstream_change_or_force_redo_the_stage(tmp_path):
    root = str(tmp_path)
    up = StageRunner(root).run("up", "U", {"n": 1}, [], Work(1))
    StageRunner(root).run("down", "D", {}, [up], Work(1))

    work = Work(2)
    StageRunner(root).run("down", "D", {"other": True}, [up], work)  # new settings
    assert work.calls == 1
    changed_up = StageRunner(root).run("up", "U", {"n": 2}, [], Work(3))
    work = Work(4)
    StageRunner(root).run("down", "D", {"other": True}, [changed_up], work)  # upstream redone
    assert work.calls == 1
    work = Work(5)
    record = StageRunner(root, force=True).run("down", "D", {"other": True}, [changed_up], work)
    assert work.calls == 1 and not record.reused
    assert open(os.path.join(root, "down", "out.txt")).read() == "5"


def test_crashed_stage_leaves_no_marker_and_is_redone_from_a_clean_directory(tmp_path):
    root = str(tmp_path)
    with pytest.raises(RuntimeError, match="stage crashed"):
        StageRunner(root).run("a", "A", {}, [], Work(1, fail=True))
    assert not os.path.exists(os.path.join(root, "a", MARKER))
    leftover = os.path.join(root, "a", "stale.txt")
    open(leftover, "w").close()
    record = StageRunner(root).run("a", "A", {}, [], Work(2))
    assert not record.reused and not os.path.exists(leftover)
    with open(os.path.join(root, "a", MARKER)) as f:
        assert json.load(f)["figures"] == {"value": 2}
