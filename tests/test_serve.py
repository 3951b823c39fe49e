"""``zdepth serve``: GPU detection, supervision (restart on crash, stop on SIGTERM), and a live run."""

from __future__ import annotations

import logging
import os
import random
import re
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
from zdepth.config import BrokerConfig, Heartbeat, WorkerConfig
from zdepth.protocol.curve import CurveClient, CurveServer, generate
from zdepth.supervisor import (
    EXIT_ADDRESS,
    EXIT_FAILURE,
    PERMANENT_EXITS,
    ChildSpec,
    Supervisor,
    broker_argv,
    connect_address,
    describe_exit,
    detect_devices,
    worker_argv,
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
def test_supervisor_backs_off_a_child_that_keeps_crashing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zdepth.supervisor")
    starts: list[float] = []
    crasher = ChildSpec("worker cuda:0", [sys.executable, "-c", "raise SystemExit(1)"])
    supervisor = Supervisor([crasher], restart_delay_s=0.2, max_restart_delay_s=0.8, max_failures=None, on_start=lambda s, p: starts.append(time.monotonic()))
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(starts) >= 5, 30, "five starts")
    finally:
        supervisor.stop()
        thread.join(30)
    delays = [float(m.group(1)) for r in caplog.records if (m := re.search(r"restarting in ([\d.]+) s", r.message))][:4]
    for n, delay in enumerate(delays, start=1):  # a random share of 0.2, 0.4, 0.8, 0.8 s: at least half
        ceiling = min(0.8, 0.2 * 2 ** (n - 1))
        assert ceiling / 2 - 0.05 <= delay <= ceiling + 0.05, delays
    gaps = np.diff(starts[:5])
    assert all(gap >= delay for gap, delay in zip(gaps, delays)), (gaps, delays)


def test_backoff_is_jittered_and_capped() -> None:
    supervisor = Supervisor([], restart_delay_s=1.0, max_restart_delay_s=30.0, rand=random.Random(7))
    for failures in range(1, 10):
        ceiling = min(30.0, 2.0 ** (failures - 1))
        samples = [supervisor.backoff(failures) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in samples)
        assert len(set(samples)) > 40  # jitter: children that crashed together do not restart in step


@pytest.mark.timeout(60)
def test_supervisor_gives_up_on_a_child_that_never_stays_up(caplog: pytest.LogCaptureFixture) -> None:
    crasher = ChildSpec("worker cpu", [sys.executable, "-c", "raise SystemExit(1)"])
    sleeper = ChildSpec("broker", SLEEPER, stop_timeout_s=5)
    started = time.monotonic()
    supervisor = Supervisor([sleeper, crasher], restart_delay_s=0.05, max_restart_delay_s=0.1, max_failures=3)
    assert supervisor.run() == EXIT_FAILURE
    assert time.monotonic() - started < 20
    assert "3th failure in a row" in (supervisor.failure or "") and "giving up" in supervisor.failure
    assert supervisor.pids == {"broker": None, "worker cpu": None}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", sorted(PERMANENT_EXITS))
def test_a_permanent_exit_stops_everything_at_once(code: int, tmp_path: Path) -> None:
    """A bad setting, a missing checkpoint or a port in use: no restart, every other child stopped, that status returned."""
    starts: list[str] = []
    failing = ChildSpec("worker cuda:0", [sys.executable, "-c", f"import time; time.sleep(0.5); raise SystemExit({code})"], group=1)
    healthy = ChildSpec("worker cuda:1", SLEEPER, stop_timeout_s=5, group=1)
    supervisor = Supervisor([ChildSpec("broker", SLEEPER, stop_timeout_s=5), failing, healthy], restart_delay_s=0.05, on_start=lambda s, p: starts.append(s.name))
    started = time.monotonic()
    assert supervisor.run() == code
    assert time.monotonic() - started < 10
    assert starts == ["broker", "worker cuda:0", "worker cuda:1"]  # never restarted
    assert PERMANENT_EXITS[code] in (supervisor.failure or "") and "worker cuda:0" in supervisor.failure
    assert all(pid is None for pid in supervisor.pids.values())


REPORTER = """
import json, os, sys, time
time.sleep(float(sys.argv[1]))
with os.fdopen(int(os.environ["ZDEPTH_READY_FD"]), "w") as pipe:
    pipe.write(json.dumps({"workers": "tcp://127.0.0.1:" + sys.argv[2]}) + "\\n")
time.sleep(120)
"""


@pytest.mark.timeout(60)
def test_later_groups_start_once_the_broker_reports_and_get_what_it_reported() -> None:
    starts: list[tuple[str, float, list[str]]] = []
    seen: list[dict] = []

    def worker_argv(ready):
        seen.append(dict(ready))
        return [*SLEEPER, ready["broker"]["workers"]]

    broker = ChildSpec("broker", [sys.executable, "-c", REPORTER, "1.0", "7123"], stop_timeout_s=5, ready=True)
    worker = ChildSpec("worker cpu", worker_argv, stop_timeout_s=5, group=1)
    supervisor = Supervisor([broker, worker], on_start=lambda s, p: starts.append((s.name, time.monotonic(), list(p.args))))
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(starts) == 2, 20, "the worker")
    finally:
        supervisor.stop()
        thread.join(30)
    (_, broker_at, _), (_, worker_at, worker_args) = starts
    assert worker_at - broker_at >= 1.0  # it waited for the report
    assert seen == [{"broker": {"workers": "tcp://127.0.0.1:7123"}}]
    assert worker_args[-1] == "tcp://127.0.0.1:7123"
    assert supervisor.ready == {"broker": {"workers": "tcp://127.0.0.1:7123"}}


@pytest.mark.timeout(60)
def test_a_broker_that_cannot_bind_means_no_worker_ever_starts() -> None:
    starts: list[str] = []
    broker = ChildSpec("broker", [sys.executable, "-c", f"raise SystemExit({EXIT_ADDRESS})"], ready=True)
    worker = ChildSpec("worker cpu", lambda ready: pytest.fail("a worker started"), group=1)
    supervisor = Supervisor([broker, worker], on_start=lambda s, p: starts.append(s.name))
    assert supervisor.run() == EXIT_ADDRESS
    assert starts == ["broker"]


@pytest.mark.timeout(60)
def test_a_broker_that_never_reports_is_killed_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zdepth.supervisor")
    starts: list[int] = []
    broker = ChildSpec("broker", SLEEPER, ready=True, stop_timeout_s=5)
    supervisor = Supervisor([broker], ready_timeout_s=0.5, restart_delay_s=0.05, max_failures=2, on_start=lambda s, p: starts.append(p.pid))
    assert supervisor.run() == EXIT_FAILURE
    assert len(starts) == 2
    assert "did not report ready within" in caplog.text


STOPPER = """
import signal, sys, time
def stop(*_):
    with open(sys.argv[1], "a") as log:
        log.write(f"{sys.argv[2]} {time.time()}\\n")
    time.sleep(1.0)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
time.sleep(120)
"""


@pytest.mark.timeout(60)
def test_workers_stop_together_then_the_broker(tmp_path: Path) -> None:
    log = tmp_path / "stops.log"
    children = [ChildSpec("broker", [sys.executable, "-c", STOPPER, str(log), "broker"], stop_timeout_s=10)]
    children += [ChildSpec(f"worker {i}", [sys.executable, "-c", STOPPER, str(log), f"worker{i}"], stop_timeout_s=10, group=1) for i in range(3)]
    procs: list[subprocess.Popen] = []
    supervisor = Supervisor(children, on_start=lambda s, p: procs.append(p))
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    wait_until(lambda: len(procs) == 4, 20, "four children")
    time.sleep(1.0)  # let them install their handlers
    started = time.monotonic()
    supervisor.stop()
    thread.join(30)
    took = time.monotonic() - started
    stops = {name: float(at) for name, at in (line.split() for line in log.read_text().splitlines())}
    workers = [stops[f"worker{i}"] for i in range(3)]
    assert max(workers) - min(workers) < 0.5  # all at once, not one after another
    assert stops["broker"] >= max(workers) + 0.9  # the broker once they had exited
    assert took < 3.5  # about 1 s for the workers, 1 s for the broker; one by one would take 4 s


STUBBORN = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"]


@pytest.mark.timeout(60)
def test_slow_children_of_a_group_are_waited_for_together() -> None:
    """Two workers that take their whole stop timeout (2 s) are stopped in about 2 s, not 4: SIGTERM to both, one wait."""
    children = [ChildSpec(f"worker {i}", STUBBORN, stop_timeout_s=2.0, group=1) for i in range(2)]
    procs: list[subprocess.Popen] = []
    supervisor = Supervisor(children, on_start=lambda s, p: procs.append(p))
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    wait_until(lambda: len(procs) == 2, 20, "two children")
    time.sleep(1.0)  # let them install their handlers
    started = time.monotonic()
    supervisor.stop()
    thread.join(30)
    took = time.monotonic() - started
    assert [p.returncode for p in procs] == [-signal.SIGKILL, -signal.SIGKILL]  # both outlasted their timeout
    assert 1.9 <= took < 3.5, took  # one stop timeout (plus a poll), not two


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
def test_serve_children_die_with_a_killed_supervisor(tmp_path: Path, weights_dir: Path) -> None:
    """Even SIGKILL on `zdepth serve` leaves no orphan broker holding the port (Linux: PDEATHSIG).

    Every setting comes from the environment here, as a service manager would give it.
    """
    clients, workers = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    env = child_env(
        weights_dir, ZDEPTH_CLIENTS=clients, ZDEPTH_WORKERS=workers, ZDEPTH_DEVICE="cpu", ZDEPTH_WARMUP="none",
        ZDEPTH_MODEL="vits-hypersim", ZDEPTH_LOG_LEVEL="debug", ZDEPTH_KEY="from-env",
    )  # fmt: skip
    serve = spawn(zdepth_argv("serve"), tmp_path / "serve.log", env)
    known: set[int] = set()
    try:
        health = wait_for_health(clients, key="from-env", procs=[serve], timeout=120)
        assert [(w["device"], w["models"]) for w in health["workers"]] == [("cpu", ["vits-hypersim"])]
        assert " DEBUG " in serve.output()
        known.update(children_of(serve.pid))
        assert len(known) == 2
        serve.stop(signal.SIGKILL)
        for pid in known:
            wait_until(lambda pid=pid: not alive(pid), 20, f"child {pid} to exit")
    finally:
        serve.stop(signal.SIGKILL)
        kill_quietly(sorted(known))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args, code, says",
    [
        (["--weights-dir", "{empty}"], 3, "checkpoint for model 'vits' not found: {empty}/depth_anything_v2_vits.pth"),
        (["-m", "vits-hypersim", "-m", "vitz"], 2, "unknown model 'vitz'"),
        (["--warmup", "tall"], 2, "HEIGHTxWIDTH"),
        (["--clients", "tcp://127.0.0.1"], 2, "--clients: 'tcp://127.0.0.1' has no port"),
        (["--max-batch", "0"], 2, "--max-batch"),
    ],
)
def test_serve_refuses_to_start_and_says_why(tmp_path: Path, weights_dir: Path, args: list[str], code: int, says: str) -> None:
    """Checked before any child starts: a clear message and a status that says restarting cannot help."""
    empty = tmp_path / "empty"
    empty.mkdir()
    ports = ["--clients", f"tcp://127.0.0.1:{free_port()}", "--workers", f"tcp://127.0.0.1:{free_port()}"]
    argv = zdepth_argv("serve", *ports, "--device", "cpu", *(a.format(empty=empty) for a in args))
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, env=child_env(weights_dir, COLUMNS="200"), timeout=50)
    assert out.returncode == code, out.stdout + out.stderr
    assert says.format(empty=empty) in out.stderr
    assert "started broker" not in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - started < 30


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_serve_stops_when_a_worker_cannot_start(tmp_path: Path, weights_dir: Path) -> None:
    """A worker's own refusal (here a CUDA device on a machine without one) ends serve with its status, not a restart loop."""
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has CUDA")
    clients, workers = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    argv = zdepth_argv("serve", "--clients", clients, "--workers", workers, "--device", "cuda:0", "--warmup", "none", "--restart-delay", "0.1")
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, env=child_env(weights_dir), timeout=100)
    assert out.returncode == 2, out.stderr
    assert "--device cuda:0: CUDA is not available on this machine; use --device cpu" in out.stderr
    assert "restarting cannot help" in out.stderr and "restarting in" not in out.stderr
    assert out.stderr.count("started worker") == 1 and "all children stopped" in out.stderr
    assert time.monotonic() - started < 60


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_serve_on_the_same_ports_exits_at_once(tmp_path: Path, weights_dir: Path) -> None:
    """Its broker cannot bind, so it exits with EXIT_ADDRESS; no worker of it ever starts, let alone joins the first broker."""
    clients, workers = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    ports = ["--clients", clients, "--workers", workers, "--device", "cpu", "--warmup", "none"]
    first = spawn(zdepth_argv("serve", *ports), tmp_path / "first.log", child_env(weights_dir, ZDEPTH_KEY="first"))
    known: set[int] = set()
    try:
        health = wait_for_health(clients, key="first", procs=[first], timeout=120)
        known.update(children_of(first.pid))
        (worker,) = health["workers"]
        started = time.monotonic()
        second = subprocess.run(zdepth_argv("serve", *ports), capture_output=True, text=True, env=child_env(weights_dir, ZDEPTH_KEY="second"), timeout=60)
        assert second.returncode == EXIT_ADDRESS, second.stderr
        assert time.monotonic() - started < 20
        assert f"cannot listen on --clients {clients}: Address already in use" in second.stderr
        assert "another zdepth broker or `zdepth serve`" in second.stderr
        assert "started worker" not in second.stderr
        health = wait_for_health(clients, key="first", procs=[first], timeout=10)
        assert [w["pid"] for w in health["workers"]] == [worker["pid"]]  # still only the first serve's worker
        assert first.stop(signal.SIGTERM, timeout=60) == 0, first.tail()
    finally:
        first.stop(signal.SIGKILL)
        kill_quietly(sorted(known))


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[list[ChildSpec]]:
    """The children each ``zdepth serve`` run would start: its supervisor is replaced by one that only records them."""
    runs: list[list[ChildSpec]] = []

    class NotRunning:
        def __init__(self, children, **options):
            runs.append(children)

        def run(self):
            return 0

        def stop(self):
            return None

    monkeypatch.setattr("zdepth.supervisor.Supervisor", NotRunning)
    return runs


def test_serve_hands_the_engine_options_to_every_worker(monkeypatch: pytest.MonkeyPatch, runner, weights_dir: Path, built) -> None:
    """The worker command lines serve builds (the supervisor that would run them is replaced)."""
    from zdepth.cli import app

    monkeypatch.setenv("ZDEPTH_WEIGHTS_DIR", str(weights_dir))
    args = ["serve", "--device", "cuda:0,cuda:1", "--cuda-graphs", "--gpu-decode", "--compile", "--max-batch", "4", "--workers", "tcp://*:*"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    broker, *workers = built[0]
    assert (broker.name, broker.group, broker.ready) == ("broker", 0, True)
    first = broker.argv({})
    assert first[first.index("--workers") + 1] == "tcp://*:*"
    reported = {"broker": {"clients": "tcp://0.0.0.0:5555", "workers": "tcp://0.0.0.0:41234"}}
    again = broker.argv(reported)  # a restart binds the port the first start got
    assert again[again.index("--workers") + 1] == "tcp://0.0.0.0:41234" and again[again.index("--clients") + 1] == "tcp://*:5555"
    assert [(child.name, child.group) for child in workers] == [("worker cuda:0", 1), ("worker cuda:1", 1)]
    for child in workers:
        argv = child.argv(reported)
        assert argv[argv.index("--broker") + 1] == "tcp://127.0.0.1:41234"  # where our own broker really listens
        assert {"--cuda-graphs", "--gpu-decode", "--compile"} <= set(argv)
        assert argv[argv.index("--max-batch") + 1] == "4"
    result = runner.invoke(app, ["serve", "--device", "cpu"])
    worker = next(child for child in built[1] if child.name.startswith("worker"))
    argv = worker.argv({"broker": {"workers": "tcp://0.0.0.0:5556"}})
    assert {"--no-gpu-decode", "--no-compile"} <= set(argv)
    assert not {"--cuda-graphs", "--no-cuda-graphs"} & set(argv)  # the worker's own default: on for CUDA


def test_serve_on_a_cpu_only_box_shares_the_cores_among_several_workers(monkeypatch: pytest.MonkeyPatch, runner, weights_dir: Path, built) -> None:
    from zdepth.worker.cpu import MAX_CPU_WORKERS, cpu_workers

    assert [cpu_workers(cores) for cores in (1, 2, 3, 4, 8, 64)] == [(1, 1), (2, 1), (3, 1), (4, 1), (4, 2), (4, 16)]
    assert MAX_CPU_WORKERS == 4
    monkeypatch.setattr("zdepth.supervisor.detect_devices", lambda: ["cpu"])  # as on a box without a GPU
    monkeypatch.setattr("zdepth.worker.cpu.available_cores", lambda: 2)
    monkeypatch.setenv("ZDEPTH_WEIGHTS_DIR", str(weights_dir))
    from zdepth.cli import app

    assert runner.invoke(app, ["serve"]).exit_code == 0
    workers = [child for child in built[0] if child.name.startswith("worker")]
    assert [child.name for child in workers] == ["worker cpu #1", "worker cpu #2"]
    for child in workers:
        argv = child.argv({"broker": {"workers": "tcp://0.0.0.0:5556"}})
        assert argv[argv.index("--device") + 1] == "cpu" and argv[argv.index("--threads") + 1] == "1"
    assert runner.invoke(app, ["serve", "--device", "cpu"]).exit_code == 0  # a device named: one worker, its own plan
    assert [child.name for child in built[1] if child.name.startswith("worker")] == ["worker cpu"]


# ----------------------------------------------------------------------------- serve's children's command lines


@pytest.fixture
def curve_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(secret, public, allow folder): a real certificate pair, its public half allowed."""
    public, secret = generate(tmp_path / "certs", "peer")
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / public.name).write_bytes(public.read_bytes())
    return secret, public, allow


@pytest.mark.timeout(60)
def test_worker_argv_parses_back_to_the_same_config(runner, monkeypatch: pytest.MonkeyPatch, weights_dir: Path, curve_pair) -> None:
    """What serve runs a worker with is what serve was given: its command line, read by the real CLI, is the config again."""
    from zdepth.cli import app

    secret, public, _ = curve_pair
    seen: list[WorkerConfig] = []
    monkeypatch.setattr("zdepth.worker.run_worker", lambda config: seen.append(config) or 0)
    everything = WorkerConfig(
        broker="tcp://127.0.0.1:5556,tcp://10.0.0.2:6000", models=("vits", "vits-hypersim"), key="k", device="cpu", precision="fp32",
        weights_dir=str(weights_dir), compile=True, cuda_graphs=False, gpu_decode=True, max_batch=3, max_wait_ms=2.5, capacity=5,
        threads=2, pipeline=False, max_pixels=1_000_000, metrics_port=9100, heartbeat=Heartbeat(0.5, 4),
        curve=CurveClient(secret, public), warmup_sizes=((64, 96), (32, 32)),
    )  # fmt: skip
    defaults = WorkerConfig(device="cpu", weights_dir=str(weights_dir), warmup_sizes=())
    for config in (everything, defaults):
        argv = worker_argv(config, log_level="warning")
        assert argv[:4] == [sys.executable, "-m", "zdepth", "worker"]
        assert "k" not in argv  # the key travels in ZDEPTH_KEY, never on a command line
        result = runner.invoke(app, argv[3:], env={"ZDEPTH_KEY": config.key} if config.key else {})
        assert result.exit_code == 0, result.output
        assert seen[-1] == config
    with pytest.raises(ValueError, match="summary_interval_s"):
        worker_argv(WorkerConfig(summary_interval_s=1.0))


@pytest.mark.timeout(60)
def test_broker_argv_parses_back_to_the_same_config(runner, monkeypatch: pytest.MonkeyPatch, curve_pair, broker_configs: list) -> None:
    from zdepth.cli import app

    secret, _, allow = curve_pair
    seen = broker_configs
    everything = BrokerConfig(
        clients="tcp://127.0.0.1:7001", workers="tcp://*:*", key="k", heartbeat=Heartbeat(0.25, 5), max_queue=7, max_queue_bytes=1000,
        max_client_bytes=500, client_reply_hwm=9, default_timeout_s=12.5, drain_timeout_s=0.5, reconnect_grace_s=3.0,
        curve=CurveServer(secret, allow), metrics_port=9200,
    )  # fmt: skip
    for config in (everything, BrokerConfig()):
        argv = broker_argv(config)
        assert argv[:4] == [sys.executable, "-m", "zdepth", "broker"]
        result = runner.invoke(app, argv[3:], env={"ZDEPTH_KEY": config.key} if config.key else {})
        assert result.exit_code == 0, result.output
        assert seen[-1] == config
