"""The benchmarks still run: each one in its tiny ``--quick`` mode, as a subprocess.

Benchmarks are scripts, not timed tests (see benchmarks/README.md); these only
keep them from rotting as the code under them changes. No number is asserted
beyond "a result came back". The HTTP baseline of the transport benchmark
needs the ``bench`` extras (fastapi, uvicorn, requests); without them that
mode is left out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
HTTP_DEPS = all(importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn", "requests"))


def run_quick(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--json", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["machine"]["cores"] and result["report"]
    return result


def test_transport(tmp_path):
    # Every kind of peer once (the -mpn, -ipc and -nowait variants only change a parameter).
    modes = "http,zmq-direct,zmq-proxy,broker-dealer,broker-client,broker-worker"
    if not HTTP_DEPS:
        modes = modes.removeprefix("http,")
    result = run_quick("transport", tmp_path, "--modes", modes, "--baseline-source", str(ROOT))  # this tree against itself
    assert set(result["modes"]) == set(modes.split(",")) | {"broker-dealer-baseline"}
    assert all(stats["n"] > 0 and stats["p50"] > 0 for stats in result["modes"].values())
    assert result["components"]
    assert any(goal.startswith("broker hop <= 1.3x") for goal in result["targets"])


def test_wire_format(tmp_path):
    result = run_quick("wire_format", tmp_path)
    assert set(result["modes"]) >= {"raw", "raw-jpeg", "jpeg-bytes"} and result["break_even_mbit"] > 0


def test_serving(tmp_path):
    result = run_quick("serving", tmp_path, "--device", "cpu")
    assert {run["input"] for run in result["runs"]} == {"jpeg", "raw", "raw-jpeg"}
    assert all(run["frames"] > 0 and run["errors"] == 0 for run in result["runs"])


def test_inprocess(tmp_path):
    result = run_quick("inprocess", tmp_path, "--device", "cpu", "--forward", "--batches", "1,2")
    assert [row["batch"] for row in result["end_to_end"]] == [1, 1, 2]
    assert len(result["forward"]) == 2


def test_accuracy(tmp_path):
    result = run_quick("accuracy", tmp_path, "--device", "cpu")
    assert result["passed"] and {row["check"] for row in result["checks"]} == {"fast-path", "fp16", "torch-pre"}


def test_report_renders_a_section(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import report
    finally:
        sys.path.remove(str(BENCHMARKS))
    fake = {"benchmark": "transport", "config": {"quick": True}, "report": ["### T\n\n| a |\n|---|\n| 1 |"]}
    text = "# Results\n\nhand-written\n\n<!-- BEGIN cpu -->\nold\n<!-- END cpu -->\n\nafter\n"
    body = report.render([fake], title="CPU")
    new = report.replace_section(text, "cpu", body)
    assert "hand-written" in new and "after" in new and "old" not in new and "#### T" in new
    assert report.replace_section(new, "cpu", body) == new


def test_gpu_script_parses():
    subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_run.sh")], check=True)


def test_gpu_profile(tmp_path):
    result = run_quick("gpu_profile", tmp_path, "--encoders", "vits")
    assert {row["condition"] for row in result["rows"]} >= {"back to back, main thread"}
    assert any(row["stage (batch 1)"].startswith("forward") for row in result["stages"])


@pytest.mark.skipif(not HTTP_DEPS, reason="the old architecture needs the bench extras (fastapi, uvicorn, requests)")
def test_old_architecture(tmp_path):
    result = run_quick("old_architecture", tmp_path)
    assert {row["streams"] for row in result["rows"]} == {1, 2}
    assert all(run["frames"] > 0 and run["error_count"] == 0 for runs in result["runs"].values() for run in runs if "error_count" in run)
    assert [row["target"] for row in result["targets"]][0].startswith("zdepth >= 1.5x")


def test_depth_codec(tmp_path):
    result = run_quick("depth_codec", tmp_path)
    assert [row["codec"] for row in result["rows"]][0] == "float16 as is"
    assert all(row["ratio"] >= 1.0 for row in result["rows"])


def test_compile_ready(tmp_path):
    result = run_quick("compile_ready", tmp_path, "--device", "cpu")
    assert [row["start"] for row in result["rows"]] == ["eager (no compile)", "compile, cold cache", "compile, warm cache"]
