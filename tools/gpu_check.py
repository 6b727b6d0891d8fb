#!/usr/bin/env python3
"""The GPU check: on a bare CUDA machine, build MegaDual, run its GPU tests and measure it.

    python3 tools/gpu_check.py OUT                 # on the GPU machine (about 8 minutes)
    python3 tools/gpu_check.py OUT --cpu-smoke     # the same code paths with tiny CPU shapes

Stages, in order, each a subprocess with its own time limit inside one overall budget
(--budget-s); a stage that fails is recorded and the next one still runs:

  environment   python, torch, CUDA, the GPU, nvcc
  wheels        the packages the machine lacks (tools/gpu_wheels.sh downloads them into .whl/),
                installed with `pip install --no-index --no-deps --target` (no registry there)
  build         the C++/CUDA extension for sm_90 (`pip install --no-deps --no-build-isolation -e .`
                with MAX_JOBS=16; `setup.py build_ext --inplace` if that fails), timed, then
                checked: the CUDA kernels must be registered
  gpu-tests     `pytest -m gpu` over the files that mark GPU tests (junit.xml kept)
  bench-*       benchmarks/*.py with --json, each a ratio against its named baseline

OUT receives summary.json, summary.md (the figures and the targets, met or missed), log.txt
(every stage's command and output) and junit.xml. The exit status is 1 when a stage failed.
--cpu-smoke skips the build (it checks the installed extension instead) and runs every other
stage at shapes a 2-core machine finishes in about a minute; its figures are no target run.
Standard library only: it must start on a machine that has nothing but torch.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SO400M = "configs/dualtoken-so400m-384.yaml"
DEBUG_TOKENIZER = "configs/debug/tokenizer.yaml"

# What the environment stage prints, as one JSON line (run by the interpreter under test).
ENVIRONMENT_PROBE = """
import json, platform, shutil, subprocess, torch, torch.utils.cpp_extension
nvcc = shutil.which("nvcc") or (torch.utils.cpp_extension.CUDA_HOME or "") + "/bin/nvcc"
try:
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except OSError:
    nvcc_version = None
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                  "cuda_available": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
                  "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
                  "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
                  "nvcc": nvcc_version}))
"""
# The extension must register every op, and on CUDA the GPU kernels too.
EXTENSION_PROBE = """
import json, torch, megadual.ops as ops
has = torch._C._dispatch_has_kernel_for_dispatch_key
ok = ops.extension_available()
print(json.dumps({"extension": ok, "cpu_kernels": ok and has("megadual::rq_encode", "CPU"),
                  "cuda_kernels": ok and has("megadual::rq_encode", "CUDA")}))
"""


@dataclass
class Bench:
    """One benchmark script: its arguments on the GPU and in --cpu-smoke, and a time limit."""

    name: str
    script: str
    gpu_args: list
    smoke_args: list
    timeout_s: int


BENCHES = [
    Bench("rq", "benchmarks/rq.py",
          ["--compare", "argmin", "--device", "cuda", "--shapes", "dualtoken-gpu", "--repeats", "5"],
          ["--compare", "argmin", "--shapes", "small", "--repeats", "2"], 90),
    Bench("rq-joint", "benchmarks/rq.py",
          ["--compare", "joint", "--device", "cuda", "--shapes", "tokenflow-gpu", "--repeats", "5"],
          ["--compare", "joint", "--shapes", "tokenflow-small", "--repeats", "1"], 90),
    Bench("backbone-3b", "benchmarks/backbone.py",
          ["--preset", "qwen2.5-3b", "--device", "cuda", "--dtype", "bf16", "--seq", "4096", "--batch", "1",
           "--docs", "4", "--repeats", "5", "--warmup", "2"],
          ["--preset", "small", "--layers", "2", "--seq", "128", "--batch", "1", "--docs", "2", "--repeats", "2",
           "--warmup", "1"], 150),
    Bench("tokenizer-encode", "benchmarks/tokenizer.py",
          ["--encode", SO400M, "--device", "cuda", "--dtype", "bf16", "--encode-batch", "64"],
          ["--encode", DEBUG_TOKENIZER, "--encode-batch", "4", "--repeats", "2"], 90),
    Bench("extract", "benchmarks/extract.py",
          ["--config", SO400M, "--num", "1024", "--batch-size", "64", "--workers", "8", "--repeats", "2",
           "--device", "cuda"],
          ["--num", "64", "--batch-size", "16", "--shard-size", "32", "--repeats", "1", "--device", "cpu"], 120),
    Bench("mllm", "benchmarks/mllm.py",
          ["--device", "cuda", "--dtype", "bf16", "--repeats", "10"],
          ["--repeats", "2", "--warmup", "1", "--gen-repeats", "1", "--batches", "2", "--gen-batch", "2",
           "--caption-tokens", "8"], 120),
    Bench("backbone-1.5b", "benchmarks/backbone.py",
          ["--preset", "qwen2.5-1.5b", "--device", "cuda", "--dtype", "bf16", "--seq", "4096", "--batch", "1",
           "--docs", "4", "--repeats", "5", "--warmup", "2"],
          ["--preset", "small", "--layers", "1", "--seq", "64", "--batch", "1", "--docs", "2", "--repeats", "2",
           "--warmup", "1"], 120),
]


@dataclass
class Target:
    """A figure of the summary and the value it must reach on one H200."""

    name: str
    bench: str
    path: tuple  # keys into that benchmark's JSON; "*" takes a one-entry dict's entry
    minimum: float
    unit: str


TARGETS = [
    Target("backbone MFU, Qwen2.5-3B, bf16, seq 4096 packed", "backbone-3b", ("rows", "megadual", "mfu"), 0.45, "MFU"),
    Target("RQ encode + EMA vs GEMM + argmin (D 32, K 16384, R 8, 729 x 64 rows)", "rq",
           ("*", "speedup_train"), 5.0, "x"),
    Target("tokenizer encode, so400m-384, bf16", "tokenizer-encode", ("encode_images_per_s",), 600.0, "images/s"),
    Target("extraction vs bare encode (steady state)", "extract", ("steady_vs_encode",), 0.9, "x"),
]

# Further figures the summary quotes (no target).
FIGURES = [
    ("shared-index RQ search vs its reference (TokenFlow dims, 729 x 64 rows)", "rq-joint", ("*", "speedup_vs_reference")),
    ("backbone MFU, Qwen2.5-1.5B", "backbone-1.5b", ("rows", "megadual", "mfu")),
    ("backbone 3B step time vs transformers + SDPA", "backbone-3b", ("rows", "megadual", "time_vs_transformers")),
    ("backbone 3B peak GPU memory (bytes)", "backbone-3b", ("peak_memory_bytes",)),
    ("RQ encode vs GEMM + argmin", "rq", ("*", "speedup_encode")),
    ("tokenizer encode vs HF SigLIP forward", "tokenizer-encode", ("encode_vs_hf_forward",)),
    ("extraction, end to end vs bare encode", "extract", ("end_to_end_vs_encode",)),
    ("unified model training tokens/s", "mllm", ("training", "DualTokenMLLM step (embed + backbone + heads)",
                                                 "tokens_per_s")),
    ("unified model tokens/s vs its backbone alone", "mllm", ("training", "DualTokenMLLM step (embed + backbone + heads)",
                                                            "vs_baseline")),
    ("unified model: both depth heads' step share", "mllm", ("step_share", "both depth heads (pixel + semantic)",
                                                              "time_share")),
]


@dataclass
class Check:
    """The run's state: where output goes, the budget, and what each stage gave."""

    out: str
    smoke: bool
    budget_s: float
    env: dict = field(default_factory=lambda: dict(os.environ))
    started: float = field(default_factory=time.monotonic)
    stages: list = field(default_factory=list)
    results: dict = field(default_factory=dict)

    def remaining_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def log(self, text: str) -> None:
        with open(os.path.join(self.out, "log.txt"), "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def record(self, name: str, status: str, seconds: float = 0.0, detail: str = "") -> dict:
        stage = {"name": name, "status": status, "seconds": round(seconds, 1), "detail": detail}
        self.stages.append(stage)
        self.log(f"== {name}: {status} ({seconds:.1f} s) {detail}")
        print(f"[gpu-check] {name}: {status} ({seconds:.1f} s) {detail}", flush=True)
        return stage

    def fail(self, stage: dict, detail: str) -> None:
        """Turn a stage whose command succeeded into a failure its output showed."""
        stage.update(status="failed", detail=detail)
        self.log(f"== {stage['name']}: failed after all: {detail}")
        print(f"[gpu-check] {stage['name']}: failed after all: {detail}", flush=True)

    def run(self, name: str, cmd: list, timeout_s: float, extra_env: Optional[dict] = None):
        """Run one stage's command; returns (stage record, stdout) and logs everything."""
        timeout_s = min(timeout_s, self.remaining_s())
        if timeout_s < 5:
            return self.record(name, "skipped", detail="the check's time budget is spent (--budget-s)"), ""
        env = dict(self.env, **(extra_env or {}))
        self.log(f"\n== {name}: $ {' '.join(cmd)}")
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            self.log(_text(exc.stdout) + _text(exc.stderr))
            return self.record(name, "failed", time.monotonic() - start, f"timed out after {timeout_s:.0f} s"), ""
        self.log(proc.stdout + proc.stderr)
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            return self.record(name, "failed", seconds, f"exit {proc.returncode}: {last[:300]}"), proc.stdout
        return self.record(name, "ok", seconds), proc.stdout


def _text(stream) -> str:
    if stream is None:
        return ""
    return stream.decode(errors="replace") if isinstance(stream, bytes) else stream


def _last_json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def stage_environment(check: Check) -> None:
    stage, stdout = check.run("environment", [sys.executable, "-c", ENVIRONMENT_PROBE], 60)
    check.results["environment"] = _last_json_line(stdout) if stage["status"] == "ok" else {}
    if not check.smoke and stage["status"] == "ok" and not check.results["environment"]["cuda_available"]:
        check.fail(stage, "torch.cuda.is_available() is False: run on a GPU machine, or pass --cpu-smoke")


def stage_wheels(check: Check, wheel_dir: str, site: str) -> None:
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    if not wheels:
        check.record("wheels", "skipped", detail=f"no wheels in {wheel_dir} (tools/gpu_wheels.sh makes them)")
        return
    stage, _ = check.run("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", site, *wheels], 120)
    if stage["status"] == "ok":
        stage["detail"] = f"{len(wheels)} wheels into {site}"
        check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, check.env.get("PYTHONPATH")]))


def stage_build(check: Check) -> None:
    if check.smoke:
        check.record("build", "skipped", detail="--cpu-smoke checks the extension already installed")
    else:
        stage, _ = check.run("build", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                                       "--no-build-isolation", "-e", "."], 360,
                             {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16"})
        if stage["status"] == "failed":  # e.g. a setuptools too old for PEP 660 editables: build in place
            stage, _ = check.run("build-in-place", [sys.executable, "setup.py", "build_ext", "--inplace"], 360,
                                 {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16"})
        check.results["build_s"] = stage["seconds"]
        if stage["status"] != "ok":
            return
    stage, stdout = check.run("extension", [sys.executable, "-c", EXTENSION_PROBE], 60)
    probe = _last_json_line(stdout)
    check.results["extension"] = probe
    wanted = "cpu_kernels" if check.smoke else "cuda_kernels"
    if stage["status"] == "ok" and not probe.get(wanted):
        check.fail(stage, f"{wanted} is {probe.get(wanted)} ({probe}): is megadual._C built for this torch?")


def gpu_test_files() -> list:
    """The test files that mark tests `gpu`: collecting only them keeps the CPU suite's imports
    (and any dependency the GPU machine lacks) out of this stage."""
    files = []
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "**", "test_*.py"), recursive=True)):
        with open(path) as f:
            if "pytest.mark.gpu" in f.read():
                files.append(os.path.relpath(path, REPO))
    return files


def stage_gpu_tests(check: Check) -> None:
    junit = os.path.join(check.out, "junit.xml")
    stage, _ = check.run("gpu-tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                       "--junitxml", junit, *gpu_test_files()], 240)
    if os.path.exists(junit):
        check.results["gpu_tests"] = junit_counts(junit)
        stage["detail"] = (stage["detail"] + " " + _counts_line(check.results["gpu_tests"])).strip()


def junit_counts(path: str) -> dict:
    """passed / failed / skipped counts and the failing and skipped test names of a junit file."""
    root = ElementTree.parse(path).getroot()
    failed, skipped, passed = [], [], 0
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif (skip := case.find("skipped")) is not None:
            skipped.append(f"{name} ({skip.get('message', '')})")
        else:
            passed += 1
    return {"passed": passed, "failed": failed, "skipped": skipped}


def _counts_line(counts: dict) -> str:
    return f"{counts['passed']} passed, {len(counts['failed'])} failed, {len(counts['skipped'])} skipped"


def stage_benchmarks(check: Check, scratch: str) -> None:
    for bench in BENCHES:
        path = os.path.join(scratch, f"{bench.name}.json")
        args = bench.smoke_args if check.smoke else bench.gpu_args
        stage, _ = check.run(f"bench-{bench.name}", [sys.executable, bench.script, *args, "--json", path],
                             bench.timeout_s, {"PYTHONUNBUFFERED": "1"})
        if stage["status"] == "ok":
            with open(path) as f:
                check.results.setdefault("benchmarks", {})[bench.name] = json.load(f)


def lookup(results: dict, bench: str, path: tuple):
    value = results.get("benchmarks", {}).get(bench)
    for key in path:
        if isinstance(value, dict) and key == "*" and len(value) == 1:
            key = next(iter(value))  # rq.py keys its results by shape, which differs in --cpu-smoke
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def target_rows(check: Check) -> list:
    rows = []
    for target in TARGETS:
        value = lookup(check.results, target.bench, target.path)
        if value is None:
            verdict = "not measured"
        elif check.smoke:
            verdict = "not a target run (--cpu-smoke)"
        else:
            verdict = "met" if value >= target.minimum else f"missed by {100 * (1 - value / target.minimum):.0f}%"
        rows.append({"name": target.name, "value": value, "target": target.minimum, "unit": target.unit,
                     "verdict": verdict})
    return rows


def write_summary(check: Check) -> dict:
    summary = {"mode": "cpu-smoke" if check.smoke else "gpu", "seconds": round(time.monotonic() - check.started, 1),
               "failed": [s["name"] for s in check.stages if s["status"] == "failed"], "stages": check.stages,
               "targets": target_rows(check),
               "figures": [{"name": n, "value": lookup(check.results, b, p)} for n, b, p in FIGURES],
               **check.results}
    with open(os.path.join(check.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(os.path.join(check.out, "summary.md"), "w") as f:
        f.write(summary_markdown(summary))
    return summary


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def summary_markdown(summary: dict) -> str:
    env = summary.get("environment", {})
    lines = [f"# GPU check ({summary['mode']}), {summary['seconds']:.0f} s",
             "", f"{env.get('gpu') or 'no GPU'}; python {env.get('python')}, torch {env.get('torch')} "
                 f"(CUDA {env.get('torch_cuda')}), nvcc: {env.get('nvcc')}",
             "", "| stage | status | s | detail |", "|---|---|---|---|"]
    if summary["mode"] == "cpu-smoke":
        lines[1:1] = ["", "--cpu-smoke: every figure below was measured at tiny CPU shapes, not the ones named."]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['detail']} |" for s in summary["stages"]]
    lines += ["", "| target | value | needs | verdict |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {_fmt(t['value'])} | >= {t['target']:g} {t['unit']} | {t['verdict']} |"
              for t in summary["targets"]]
    lines += ["", "| figure | value |", "|---|---|"]
    lines += [f"| {fig['name']} | {_fmt(fig['value'])} |" for fig in summary["figures"]]
    tests = summary.get("gpu_tests")
    if tests:
        lines += ["", f"GPU tests: {_counts_line(tests)}"] + [f"- failed: {n}" for n in tests["failed"]]
        lines += [f"- skipped: {n}" for n in tests["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for summary.json, summary.md, log.txt and junit.xml")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU shapes, no build: tests this script")
    parser.add_argument("--wheels", default=os.path.join(REPO, ".whl"), help="folder of wheels to install (.whl)")
    # Outside the repo, so the working tree stays clean.
    parser.add_argument("--site", default=os.path.join(tempfile.gettempdir(), "megadual-gpu-site"),
                        help="where the wheels are installed (pip --target)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="overall time limit in seconds (450)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s}: must be positive")
    os.makedirs(args.out, exist_ok=True)
    check = Check(out=args.out, smoke=args.cpu_smoke, budget_s=args.budget_s)
    check.log(f"# gpu_check on {platform.node()}, {time.strftime('%Y-%m-%d %H:%M:%S')}, "
              f"{'--cpu-smoke' if check.smoke else 'gpu'}")
    stage_environment(check)
    if check.stages[-1]["status"] == "failed":  # no CUDA (or no torch): nothing after it can mean anything
        for name in ("wheels", "build", "gpu-tests", "benchmarks"):
            check.record(name, "skipped", detail="the environment stage failed")
    else:
        stage_wheels(check, args.wheels, args.site)
        stage_build(check)
        stage_gpu_tests(check)
        with tempfile.TemporaryDirectory(prefix="megadual-gpu-check-") as scratch:
            stage_benchmarks(check, scratch)
    summary = write_summary(check)
    print(open(os.path.join(args.out, "summary.md")).read())
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
