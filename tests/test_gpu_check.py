"""tools/gpu_check.py: its --cpu-smoke run goes through every stage and benchmark, and on a
machine without CUDA its GPU mode stops after the environment with one clear reason."""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "gpu_check.py")


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(out, *args):
    return subprocess.run([sys.executable, SCRIPT, str(out), *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def _write_probe_wheel(folder):
    """A minimal pure-Python wheel, so the smoke run goes through the wheels stage's install."""
    folder.mkdir()
    info = "gpu_check_probe-0.1.dist-info"
    files = {"gpu_check_probe.py": "VALUE = 7\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(folder / "gpu_check_probe-0.1-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
        whl.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    _write_probe_wheel(out / "wheels")
    proc = _run(out, "--cpu-smoke", "--wheels", str(out / "wheels"), "--site", str(out / "site"))
    with open(out / "summary.json") as f:
        return proc, json.load(f), out


def test_cpu_smoke_runs_every_stage(smoke):
    proc, summary, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["mode"] == "cpu-smoke" and summary["failed"] == []
    statuses = {s["name"]: s for s in summary["stages"]}
    expected = ["environment", "wheels", "build", "extension", "gpu-tests"] + [
        f"bench-{b.name}" for b in _load_gpu_check().BENCHES]
    assert list(statuses) == expected
    for name, stage in statuses.items():
        assert stage["status"] == ("skipped" if name == "build" else "ok"), stage
    assert statuses["build"]["detail"] == "--cpu-smoke checks the extension already installed"
    assert (out / "site" / "gpu_check_probe.py").exists() and "1 wheels" in statuses["wheels"]["detail"]
    assert summary["environment"]["torch"] and summary["extension"]["cpu_kernels"] is True
    tests = summary["gpu_tests"]  # without CUDA every GPU test is collected and skipped
    assert tests["passed"] == 0 and tests["failed"] == [] and len(tests["skipped"]) >= 10
    for name in ("summary.md", "log.txt", "junit.xml"):
        assert (out / name).stat().st_size > 0


def test_cpu_smoke_measures_every_figure(smoke):
    _, summary, out = smoke
    for target in summary["targets"]:
        assert target["value"] > 0, target
        assert target["verdict"] == "not a target run (--cpu-smoke)"
    for figure in summary["figures"]:
        if "GPU memory" not in figure["name"]:  # measured on CUDA only
            assert figure["value"] > 0, figure
    table = (out / "summary.md").read_text()
    assert "| backbone MFU, Qwen2.5-3B, bf16, seq 4096 packed |" in table


def test_verdicts_against_targets():
    check_module = _load_gpu_check()
    check = check_module.Check(out="unused", smoke=False, budget_s=1.0)
    check.results["benchmarks"] = {"rq": {"dualtoken-gpu": {"speedup_train": 6.0}},
                                   "backbone-3b": {"rows": {"megadual": {"mfu": 0.36}}}}
    verdicts = {row["name"].split(",")[0]: row["verdict"] for row in check_module.target_rows(check)}
    assert verdicts["RQ encode + EMA vs GEMM + argmin (D 32"] == "met"
    assert verdicts["backbone MFU"] == "missed by 20%"
    assert verdicts["tokenizer encode"] == "not measured"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_mode_without_cuda_stops_after_the_environment(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["environment"]["status"] == "failed"
    assert "torch.cuda.is_available() is False" in stages["environment"]["detail"]
    assert all(s["status"] == "skipped" for name, s in stages.items() if name != "environment")
