"""Crash-safe writes (megadual/fs.py): an interrupted writer leaves the old version whole, the
next writer clears its leftovers, and outputs get the umask's permissions."""

from __future__ import annotations

import os
import stat

import pytest

from megadual.fs import atomic_output_dir, write_atomic


def test_an_interrupted_replacement_keeps_the_old_directory_whole(tmp_path):
    out = tmp_path / "export"
    with atomic_output_dir(str(out), overwrite=False) as tmp:
        (tmp_path / tmp / "weights").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(str(out), overwrite=True) as tmp:
            (tmp_path / tmp / "weights").write_text("half")
            raise KeyboardInterrupt  # as a kill in the middle of writing
    assert (out / "weights").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["export"]  # its temporary directory went with it
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        with atomic_output_dir(str(out), overwrite=False):
            pass


def test_leftovers_of_a_killed_writer_are_cleared_and_modes_follow_the_umask(tmp_path):
    out = tmp_path / "export"
    stale = tmp_path / ".export.tmp-123-deadbeef"  # what a kill -9 leaves
    stale.mkdir()
    (stale / "weights").write_text("stale")
    old_umask = os.umask(0o022)
    try:
        with atomic_output_dir(str(out), overwrite=True) as tmp:
            write_atomic(os.path.join(tmp, "config.json"), "{}")
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not 0700 as tempfile.mkdtemp made it
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644
    assert (out / "config.json").read_text() == "{}"
