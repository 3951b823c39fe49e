"""The worker's exit statuses, from real worker processes.

``zdepth serve`` (and any service manager) restarts a worker that exits 1 and
gives up on one that exits with a permanent status (zdepth.supervisor's
PERMANENT_EXITS): a key the broker refuses (2), missing weights (3), a
metrics port in use (4). Each test runs ``run_worker`` in a child process,
as ``zdepth worker`` does, and reads its exit status.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peers import KEY, start_broker
from procs import REPO, child_env, free_port
from zdepth.errors import BadRequest, ConfigError, Unauthorized, WeightsNotFound
from zdepth.metrics import MetricsBindError
from zdepth.supervisor import EXIT_ADDRESS, EXIT_CONFIG, EXIT_FAILURE, EXIT_MISSING, PERMANENT_EXITS
from zdepth.worker import exit_status

pytestmark = pytest.mark.timeout(120)

_WORKER_MAIN = """
import json, logging, sys
from zdepth.config import Heartbeat, WorkerConfig
from zdepth.worker import run_worker
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
fields = json.loads(sys.argv[1])
sys.exit(run_worker(WorkerConfig(heartbeat=Heartbeat(0.2, 10), warmup_sizes=(), models=("vits",), **fields)))
"""


def run_worker_process(tmp_path: Path, timeout: float = 90.0, **fields) -> tuple[int, str]:
    """Run a worker process with these WorkerConfig fields to its end: (exit status, its log)."""
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN, json.dumps(fields)], stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
    try:
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, log.read_text(errors="replace")


def test_each_cause_has_its_status():
    assert exit_status(Unauthorized("refused")) == EXIT_CONFIG
    assert exit_status(ConfigError("bad device")) == EXIT_CONFIG
    assert exit_status(WeightsNotFound("no checkpoint")) == EXIT_MISSING
    assert exit_status(MetricsBindError("port in use")) == EXIT_ADDRESS
    assert exit_status(BadRequest("odd")) == EXIT_FAILURE  # anything else may work next time
    assert exit_status(RuntimeError("crash")) == EXIT_FAILURE
    assert {EXIT_CONFIG, EXIT_MISSING, EXIT_ADDRESS} <= set(PERMANENT_EXITS) and EXIT_FAILURE not in PERMANENT_EXITS


def test_a_key_the_broker_refuses_exits_2(tmp_path, weights_dir):
    broker = start_broker(tmp_path)
    try:
        code, log = run_worker_process(tmp_path, broker=broker.workers, key="not-" + KEY, weights_dir=str(weights_dir))
    finally:
        broker.stop()
    assert code == EXIT_CONFIG, log
    assert "refused this worker's key" in log


def test_missing_weights_exit_3(tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    code, log = run_worker_process(tmp_path, broker=f"tcp://127.0.0.1:{free_port()}", key=KEY, weights_dir=str(empty))
    assert code == EXIT_MISSING, log
    assert "depth_anything_v2_vits.pth" in log


def test_a_metrics_port_in_use_exits_4_before_loading(tmp_path, weights_dir):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, log = run_worker_process(tmp_path, broker=f"tcp://127.0.0.1:{free_port()}", key=KEY, weights_dir=str(weights_dir), metrics_port=port)
    assert code == EXIT_ADDRESS, log
    assert f"cannot serve metrics on 0.0.0.0:{port}" in log
    assert "ready on" not in log  # failed at once, not after loading the models
