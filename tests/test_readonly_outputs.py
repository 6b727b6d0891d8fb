"""A read-only output directory (a share mounted read-only, a finished run archived): resume,
to-hf and extract each stop with one line naming the path and the cause, and leave what is
there untouched.

The directory is made read-only with a read-only bind mount in a private mount namespace
(`unshare -m`): the suite runs as root, which ignores permission bits, but not a read-only mount.
"""

import hashlib
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "debug")
READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'


def _megadual(*args, read_only=None):
    cmd = [sys.executable, "-m", "megadual", *args]
    if read_only:
        cmd = ["unshare", "-m", "sh", "-c", READ_ONLY, "sh", str(read_only), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def _tree_digest(root):
    digest = hashlib.sha256()
    for directory, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(directory, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _assert_one_line_error(proc, path):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megadual: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "Read-only file system" in errors[0] and str(path) in errors[0] and ".tmp" not in errors[0], errors[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("read-only")
    probe = root / "probe"
    probe.mkdir()
    if subprocess.run(["unshare", "-m", "sh", "-c", READ_ONLY, "sh", str(probe), "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -m` and mount (root in a mount namespace) to make a read-only directory")
    lm = ["-c", os.path.join(CONFIGS, "lm.yaml"), "--set", f"run.out_dir={root / 'run'}", "--set", "train.steps=4",
          "--set", "train.save_every=2", "--set", "data.num_samples=128"]
    steps = [("train-lm", *lm),
             ("synth-data", "--out", str(root / "images"), "--num", "32", "--size", "32", "--shard-size", "16"),
             ("train-tokenizer", "-c", os.path.join(CONFIGS, "tokenizer.yaml"), "--set", f"run.out_dir={root / 'tok'}",
              "--set", "tokenizer_train.steps=2")]
    for args in steps:
        proc = _megadual(*args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root, lm


def test_resume_into_a_read_only_run(work):
    root, lm = work
    run = root / "run"
    before = _tree_digest(run)
    proc = _megadual("train-lm", *lm, "--set", "train.steps=6", "--resume", read_only=run)
    _assert_one_line_error(proc, run)
    assert _tree_digest(run) == before


def test_to_hf_into_a_read_only_directory(work):
    root, _ = work
    exports = root / "exports"
    exports.mkdir()
    proc = _megadual("convert", "to-hf", "--src", str(root / "run"), "--out", str(exports / "hf"), read_only=exports)
    _assert_one_line_error(proc, exports / "hf")
    assert os.listdir(exports) == []
    assert _megadual("convert", "to-hf", "--src", str(root / "run"), "--out", str(exports / "hf")).returncode == 0
    before = _tree_digest(exports)
    proc = _megadual("convert", "to-hf", "--src", str(root / "run"), "--out", str(exports / "hf"), "--overwrite",
                     read_only=exports)
    _assert_one_line_error(proc, exports / "hf")
    assert _tree_digest(exports) == before


def test_extract_into_a_read_only_directory(work):
    root, _ = work
    tokens = root / "tokens"
    tokens.mkdir()
    args = ("extract", "--input", str(root / "images"), "--out", str(tokens / "out"), "--tokenizer",
            str(root / "tok" / "tokenizer"))
    _assert_one_line_error(_megadual(*args, read_only=tokens), tokens / "out")
    assert os.listdir(tokens) == []
    assert _megadual(*args).returncode == 0
    before = _tree_digest(tokens)
    # A rerun over a finished, now read-only, extraction rewrites its manifest: refused, nothing lost.
    _assert_one_line_error(_megadual(*args, read_only=tokens / "out"), tokens / "out")
    assert _tree_digest(tokens) == before
