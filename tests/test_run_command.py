"""`megadual.launch.run_command`: output kept in the log (and echoed), failures and timeouts
reported with the command, the whole process tree killed on timeout."""

from __future__ import annotations

import sys
import time

import pytest

from megadual.launch import run_command

PY = sys.executable


def test_output_goes_to_the_log_and_is_echoed(tmp_path, capfd):
    log = tmp_path / "out.log"
    run_command([PY, "-c", "import sys; print('to stdout'); sys.stderr.write('bar\\r50%\\r100%\\n')"],
                timeout=60, log_path=str(log), echo=True)
    text = log.read_bytes()
    assert b"to stdout" in text and b"bar\r50%\r100%" in text  # carriage returns kept as written
    assert "to stdout" in capfd.readouterr().err


def test_failure_names_the_exit_code_and_shows_the_log_tail(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited with 3\n(.|\n)*last words"):
        run_command([PY, "-c", "print('last words'); raise SystemExit(3)"], timeout=60,
                    log_path=str(tmp_path / "out.log"))


def test_timeout_kills_the_child_and_its_children(tmp_path):
    marker = tmp_path / "grandchild_alive"
    # The child starts a grandchild that would write the marker after 3 s, then both sleep.
    grandchild = f"import time; time.sleep(3); open({str(marker)!r}, 'w')"
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)"
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ran past 1 s"):
        run_command([PY, "-c", script], timeout=1, log_path=str(tmp_path / "out.log"))
    assert time.monotonic() - started < 10
    time.sleep(3.5)
    assert not marker.exists()
