"""A short soak: ``benchmarks/soak.py`` for about 35 s with 2 workers and 2 clients,
a worker killed with SIGKILL (and replaced) every 12 s, and the broker killed and
restarted once half way. The checks are the long run's: every call is answered
(by a result or a typed error; none gets no reply at all), none gets
``worker_lost`` while a worker is up, the processes left at the end exit
cleanly, the cluster is healthy afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[1]


def test_soak_short(tmp_path, weights_dir):
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [
        sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "0.6", "--clients", "2", "--workers", "2",
        "--kill-every", "12", "--window", "6", "--weights-dir", str(weights_dir), "--logs", str(tmp_path / "logs"), "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)
    assert out.exists(), f"no result:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["passed"], f"{result['failures']}:\n{proc.stdout[-4000:]}"
    totals = result["totals"]
    assert result["unanswered"] == 0 and totals["no_reply"] == 0 and totals["exception"] == 0
    assert totals["worker_lost_while_a_worker_lived"] == 0, totals  # a killed worker's requests went to the live one
    assert result["worker_kills"] >= 1 and result["broker_restarts"] == 1
    assert totals["sent"] == totals["ok"] + sum(totals["errors"].values())  # each call: a result or a typed error
    assert totals["ok"] >= 0.95 * totals["sent"] and totals["ok"] > 50, totals
    assert set(totals["errors"]) <= {"worker_lost", "timeout", "overloaded", "unknown_model"}, totals["errors"]
    windows = result["windows"]
    # Calls held by the killed broker wait out their 8 s timeout, so a 6 s window may end none; the service comes back.
    assert len(windows) >= 5 and windows[-1]["ok"] > 0 and sum(w["ok"] > 0 for w in windows) >= len(windows) - 2, windows
    processes = {p["process"]: p for p in result["processes"]}
    assert processes["broker1"]["ended"].startswith("SIGKILL") and processes["broker2"]["exit"] == 0
    assert all(p["rss_start_mb"] and p["rss_end_mb"] for p in processes.values() if p["role"] == "broker")
