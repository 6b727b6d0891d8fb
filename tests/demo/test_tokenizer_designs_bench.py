"""benchmarks/tokenizer_designs.py, the design comparison, runs end to end at a tiny budget: it
trains each design through `megadual train-tokenizer` and scores all three in one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_comparison_prints_one_row_per_design(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "tokenizer_designs.py"), "--out", str(tmp_path / "work"),
         "--steps", "1", "--train-images", "32", "--held-out", "8", "--probe-images", "32", "--probe-steps", "2",
         "--json", str(tmp_path / "results.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| design")]
    assert [row.split("|")[1].strip() for row in rows] == ["dualtoken", "tokenflow", "single"]
    results = json.loads((tmp_path / "results.json").read_text())
    for design, r in results.items():
        assert 0 < r["ssim"] <= 1 and r["psnr"] > 0 and set(r["probe"]) == {"shape", "colour", "side"}, design
    assert results["tokenflow"]["codebooks"] == {"pixel": 512, "semantic": 512}
