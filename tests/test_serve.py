"""``zdepth serve``: GPU detection, supervision (restart on crash, stop on SIGTERM), and a live run."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from procs import (
    alive,
    child_env,
    children_of,
    free_port,
    kill_quietly,
    small_image,
    spawn,
    wait_for_health,
    zdepth_argv,
)

from zdepth.supervisor import (
    ChildSpec,
    Supervisor,
    connect_address,
    describe_exit,
    detect_devices,
)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ----------------------------------------------------------------------------- helpers


def test_connect_address() -> None:
    assert connect_address("tcp://*:5556") == "tcp://127.0.0.1:5556"
    assert connect_address("tcp://0.0.0.0:5556") == "tcp://127.0.0.1:5556"
    assert connect_address("tcp://10.1.2.3:5556") == "tcp://10.1.2.3:5556"
    assert connect_address("ipc:///tmp/zdepth-workers") == "ipc:///tmp/zdepth-workers"


def test_describe_exit() -> None:
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``nvidia-smi -L`` listing two GPUs, first on PATH."""
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-aaa)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-bbb)'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return script


@pytest.mark.timeout(30)
def test_detect_devices_with_nvidia_smi(fake_nvidia_smi: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_devices() == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert detect_devices() == ["cuda:0"]
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert detect_devices() == ["cpu"]


@pytest.mark.timeout(30)
def test_detect_devices_without_nvidia_smi_asks_torch_in_a_subprocess(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from zdepth import supervisor

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(supervisor, "_count_torch", lambda timeout_s: 3)
    assert detect_devices() == ["cuda:0", "cuda:1", "cuda:2"]
    monkeypatch.setattr(supervisor, "_count_torch", lambda timeout_s: 0)
    assert detect_devices() == ["cpu"]


# ----------------------------------------------------------------------------- the supervisor, with stand-in children


@pytest.mark.timeout(60)
def test_supervisor_restarts_a_crashed_child_and_stops_all(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zdepth.supervisor")
    started: list[tuple[str, int]] = []
    supervisor = Supervisor(
        [ChildSpec("broker", SLEEPER, stop_timeout_s=5), ChildSpec("worker cpu", SLEEPER, stop_timeout_s=5)],
        restart_delay_s=0.1,
        on_start=lambda spec, proc: started.append((spec.name, proc.pid)),
    )
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(started) == 2, 20, "both children")
        first_worker = started[1][1]
        os.kill(first_worker, signal.SIGKILL)
        wait_until(lambda: len(started) == 3, 20, "the restart")
        assert started[2][0] == "worker cpu" and started[2][1] != first_worker
        assert supervisor.pids["broker"] == started[0][1]  # the broker was left alone
        assert any("worker cpu" in r.message and "SIGKILL" in r.message and "restarting" in r.message for r in caplog.records)
        pids = [pid for _, pid in started]
    finally:
        supervisor.stop()
        thread.join(30)
    assert not thread.is_alive()
    for pid in pids:
        assert not alive(pid)


@pytest.mark.timeout(60)
def test_supervisor_backs_off_a_child_that_keeps_crashing() -> None:
    starts: list[float] = []
    crasher = ChildSpec("worker cuda:0", [sys.executable, "-c", "raise SystemExit(3)"])
    supervisor = Supervisor([crasher], restart_delay_s=0.2, max_restart_delay_s=0.8, on_start=lambda s, p: starts.append(time.monotonic()))
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(starts) >= 4, 30, "four starts")
    finally:
        supervisor.stop()
        thread.join(30)
    gaps = np.diff(starts[:4])
    assert gaps[1] > gaps[0] * 1.3 and gaps[2] > gaps[1] * 1.1  # 0.2, 0.4, 0.8 s plus start-up time


@pytest.mark.timeout(60)
def test_supervisor_kills_a_child_that_ignores_sigterm() -> None:
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"]
    procs = []
    supervisor = Supervisor([ChildSpec("stubborn", stubborn, stop_timeout_s=1.0)], on_start=lambda s, p: procs.append(p))
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    wait_until(lambda: procs, 20, "the child")
    time.sleep(1.0)  # let it install its handler
    started = time.monotonic()
    supervisor.stop()
    thread.join(30)
    assert procs[0].returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10


# ----------------------------------------------------------------------------- zdepth serve, for real


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_restarts_a_killed_worker_and_stops_every_child_on_sigterm(tmp_path: Path, weights_dir: Path) -> None:
    clients, workers = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    key = "serve-secret"
    env = child_env(weights_dir, ZDEPTH_KEY=key)
    argv = zdepth_argv(
        "serve", "--clients", clients, "--workers", workers, "--device", "cpu", "-m", "vits", "-m", "vits-hypersim",
        "--warmup", "none", "--max-batch", "2", "--restart-delay", "0.2",
    )  # fmt: skip
    serve = spawn(argv, tmp_path / "serve.log", env)
    known: set[int] = set()
    try:
        health = wait_for_health(clients, key=key, procs=[serve], timeout=120)
        known.update(children_of(serve.pid))
        assert len(known) == 2, serve.tail()
        (worker,) = health["workers"]
        assert worker["device"] == "cpu" and worker["pid"] in known
        assert worker["models"] == ["vits", "vits-hypersim"]

        # The key travels in the environment, never on a command line.
        for pid in known:
            assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert f"ZDEPTH_KEY={key}".encode() in Path(f"/proc/{pid}/environ").read_bytes()

        # predict against the live serve, as a real process.
        images = tmp_path / "images"
        images.mkdir()
        small_image(images / "street.jpg")
        out = subprocess.run(
            zdepth_argv("predict", str(images), "--server", clients, "--input-size", "28", "-f", "npy", "-o", str(tmp_path / "out")),
            capture_output=True, text=True, env=child_env(ZDEPTH_KEY=key), timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert np.load(tmp_path / "out" / "street.npy").shape == (64, 96)

        # A killed worker is restarted, and the crash is logged.
        os.kill(worker["pid"], signal.SIGKILL)
        health = wait_for_health(clients, key=key, procs=[serve], timeout=120, exclude_pids=[worker["pid"]])
        (replacement,) = [w for w in health["workers"] if w["pid"] != worker["pid"]]
        known.update(children_of(serve.pid))
        assert replacement["pid"] in known
        log = serve.output()
        assert "was killed by SIGKILL" in log and "restarting" in log

        # SIGTERM stops everything, cleanly.
        code = serve.stop(signal.SIGTERM, timeout=60)
        assert code == 0, serve.tail()
        for pid in known:
            wait_until(lambda pid=pid: not alive(pid), 10, f"child {pid} to exit")
        assert "all children stopped" in serve.output()
    finally:
        serve.stop(signal.SIGKILL)
        kill_quietly(sorted(known))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_serve_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    """Even SIGKILL on `zdepth serve` leaves no orphan broker holding the port (Linux: PDEATHSIG)."""
    clients, workers = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    empty = tmp_path / "weights"
    empty.mkdir()
    # No weights: the worker fails and is restarted over and over; the broker stays up.
    serve = spawn(zdepth_argv("serve", "--clients", clients, "--workers", workers, "--device", "cpu", "--restart-delay", "0.5"), tmp_path / "serve.log", child_env(empty))
    known: set[int] = set()
    try:
        wait_until(lambda: len(children_of(serve.pid)) == 2, 30, "two children")
        known.update(children_of(serve.pid))
        serve.stop(signal.SIGKILL)
        for pid in known:
            wait_until(lambda pid=pid: not alive(pid), 20, f"child {pid} to exit")
    finally:
        serve.stop(signal.SIGKILL)
        kill_quietly(sorted(known))


def test_serve_hands_the_engine_options_to_every_worker(monkeypatch: pytest.MonkeyPatch, runner) -> None:
    """The worker command lines serve builds (the supervisor that would run them is replaced)."""
    built: list[list[ChildSpec]] = []

    class NotRunning:
        def __init__(self, children, restart_delay_s):
            built.append(children)

        def run(self):
            return None

        def stop(self):
            return None

    monkeypatch.setattr("zdepth.supervisor.Supervisor", NotRunning)
    from zdepth.cli import app

    args = ["serve", "--device", "cuda:0,cuda:1", "--cuda-graphs", "--gpu-decode", "--compile", "--max-batch", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    workers = [child for child in built[0] if child.name.startswith("worker")]
    assert [child.name for child in workers] == ["worker cuda:0", "worker cuda:1"]
    for child in workers:
        assert {"--cuda-graphs", "--gpu-decode", "--compile"} <= set(child.argv)
        assert child.argv[child.argv.index("--max-batch") + 1] == "4"
    result = runner.invoke(app, ["serve", "--device", "cpu"])
    worker = next(child for child in built[1] if child.name.startswith("worker"))
    assert {"--no-gpu-decode", "--no-compile"} <= set(worker.argv)
    assert not {"--cuda-graphs", "--no-cuda-graphs"} & set(worker.argv)  # the worker's own default: on for CUDA
