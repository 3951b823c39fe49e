"""benchmarks/overlap.py still runs, in its tiny ``--quick`` mode (no number is asserted: it is a benchmark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[1]


def test_overlap_quick(tmp_path):
    out = tmp_path / "overlap.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, str(ROOT / "benchmarks" / "overlap.py"), "--quick", "--json", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, f"overlap failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["benchmark"] == "overlap" and result["report"]
    assert {run["pipeline"] for run in result["runs"]} == {True, False}
    assert all(run["frames"] > 0 and run["batches"] > 0 and 0 < run["busy"] <= 1 for run in result["runs"])
