"""One worker serving two brokers, all real processes over loopback.

Two broker processes (tests/peers.py), one ``zdepth worker --broker A
--broker B`` process on a generated vits checkpoint at input size 28 (CPU
inference in milliseconds), and zdepth.Client on each broker. Killing one
broker with SIGKILL must not interrupt the other's clients; the killed
broker, restarted on the same ports, gets the worker back.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import zdepth
from peers import KEY, BrokerProcess, start_broker
from procs import Proc, child_env, spawn, wait_for_health, zdepth_argv

pytestmark = pytest.mark.timeout(240)

IMAGE = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
HEARTBEAT = {"interval_s": 1.0, "liveness": 3}  # the worker's defaults, so neither side finds the other late
MAX_GAP_S = 2.5  # between two replies on the surviving broker; its requests take milliseconds


def ask(address: str) -> zdepth.DepthResult:
    with zdepth.Client(address, key=KEY, timeout=20, retries=0) as client:
        return client.relative_depth(IMAGE, encoder="vits", input_size=28)


def worker_pids(address: str) -> list[int]:
    with zdepth.Client(address, key=KEY, timeout=5, retries=0) as client:
        return [w.get("pid") for w in client.health()["workers"]]


class Stream(threading.Thread):
    """Requests one after another through one broker, each reply's time and outcome recorded."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.replies: list[tuple[float, str]] = []  # (time.monotonic(), "ok" or the error)
        self.halt = threading.Event()
        self.start()

    def run(self) -> None:
        with zdepth.Client(self.address, key=KEY, timeout=10, retries=0) as client:
            while not self.halt.is_set():
                try:
                    client.relative_depth(IMAGE, encoder="vits", input_size=28)
                    outcome = "ok"
                except zdepth.ZdepthError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                self.replies.append((time.monotonic(), outcome))

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


def start_worker(tmp_path: Path, weights_dir: Path, *brokers: BrokerProcess) -> Proc:
    argv = ["worker", "--model", "vits", "--device", "cpu", "--weights-dir", str(weights_dir), "--warmup", "none"]
    for broker in brokers:
        argv += ["--broker", broker.workers]
    return spawn(zdepth_argv(*argv), tmp_path / "worker.log", child_env(ZDEPTH_KEY=KEY))


def test_a_worker_serves_two_brokers_and_outlives_one(tmp_path, weights_dir):
    first = start_broker(tmp_path, **HEARTBEAT)
    second = start_broker(tmp_path, **HEARTBEAT)
    worker = start_worker(tmp_path, weights_dir, first, second)
    brokers = [first, second]
    stream = None
    try:
        for broker in brokers:
            wait_for_health(broker.clients, key=KEY, procs=[worker])
            assert worker_pids(broker.clients) == [worker.pid]  # one process, registered with each
            assert ask(broker.clients).depth.shape == (48, 64)
        log = worker.output()
        assert f"registered with broker {first.workers}" in log and f"registered with broker {second.workers}" in log

        # The first broker dies with no warning; the second one's client keeps being served.
        stream = Stream(second.clients)
        time.sleep(1.0)
        killed_at = time.monotonic()
        first.stop(9)
        wait_for_log(worker, f"broker {first.workers} silent")  # the worker found it dead (3 s) and tries to reconnect
        time.sleep(1.5)
        stream.stop()
        replies = stream.replies
        failed = [outcome for _, outcome in replies if outcome != "ok"]
        assert not failed, failed[:3]
        after = [t for t, _ in replies if t > killed_at]
        assert len(after) >= 10, f"only {len(after)} replies after the kill"
        times = [t for t, _ in replies]
        gaps = np.diff(times)
        assert gaps.max() < MAX_GAP_S, f"the surviving broker's client waited {gaps.max():.2f} s between replies"
        assert worker.popen.poll() is None

        # The first broker comes back on the same ports: the worker rejoins it by itself.
        first = start_broker(tmp_path, clients=first.clients, workers=first.workers, **HEARTBEAT)
        brokers[0] = first
        wait_for_health(first.clients, key=KEY, procs=[worker], timeout=60)
        assert worker_pids(first.clients) == [worker.pid]
        assert ask(first.clients).depth.shape == (48, 64)
        assert ask(second.clients).depth.shape == (48, 64)

        # SIGTERM drains the worker from both brokers.
        assert worker.stop() == 0, worker.tail()
        log = worker.output()
        assert "drained" in log
        drain = next(line for line in log.splitlines() if "draining:" in line)
        assert first.workers in drain and second.workers in drain, drain
    finally:
        if stream is not None:
            stream.stop()
        worker.stop(9)
        for broker in brokers:
            broker.stop()
        print(worker.tail(80))  # shown by pytest when the test fails


def wait_for_log(proc: Proc, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.output():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the worker's log:\n{proc.tail()}")
        time.sleep(0.1)
