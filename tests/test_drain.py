"""Graceful drain with real processes: SIGTERM to a worker, a rolling restart, SIGTERM to the broker.

A broker and two CPU workers as ``python -m zdepth`` processes, tiny images
(96x64) at network input 28, no warm-up. What is checked is the contract of
PROTOCOL.md: a draining worker takes no new work, answers what it holds and
leaves; every request gets exactly one reply.
"""

from __future__ import annotations

import collections
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from procs import Proc, child_env, free_port, spawn, wait_for_health, zdepth_argv
from zdepth import Client, ZdepthError
from zdepth.protocol import request_header
from zdepth.protocol.auth import apply_peer_security
from zdepth.protocol.codec import image_descriptor, params_frame

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

KEY = "drain-key"
SIZE = 28
IMAGE = np.random.default_rng(7).integers(0, 256, (64, 96, 3), dtype=np.uint8)


class Cluster:
    """A broker and workers on free loopback ports; ``close()`` kills whatever is left."""

    def __init__(self, tmp: Path, weights_dir: Path, *, heartbeat: float = 0.5) -> None:
        self.tmp, self.weights_dir, self.heartbeat = tmp, weights_dir, heartbeat
        self.clients = f"tcp://127.0.0.1:{free_port()}"
        self.workers = f"tcp://127.0.0.1:{free_port()}"
        self.env = child_env(weights_dir, ZDEPTH_KEY=KEY)
        self.procs: list[Proc] = []
        self.broker = self._spawn("broker", "broker", "--clients", self.clients, "--workers", self.workers, "--heartbeat", str(heartbeat))

    def _spawn(self, name: str, *args: str) -> Proc:
        proc = spawn(zdepth_argv(*args, "--log-level", "debug"), self.tmp / f"{name}.log", self.env)
        self.procs.append(proc)
        return proc

    def worker(self, name: str, *extra: str) -> Proc:
        return self._spawn(
            name, "worker", "--broker", self.workers, "--device", "cpu", "--model", "vits", "--warmup", "none",
            "--heartbeat", str(self.heartbeat), *extra,
        )  # fmt: skip

    def wait(self, workers: int, *, exclude_pids=()) -> dict:
        return wait_for_health(self.clients, key=KEY, workers=workers, procs=[p for p in self.procs if p.popen.poll() is None], exclude_pids=exclude_pids)

    def health(self) -> dict:
        with Client(self.clients, key=KEY, timeout=5, retries=0) as client:
            return client.health()

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(signal.SIGKILL)

    def logs(self) -> str:
        return "\n\n".join(f"--- {p.log.name} (exit {p.popen.poll()}) ---\n{p.tail(30)}" for p in self.procs)


@pytest.fixture
def cluster(tmp_path, weights_dir):
    made = Cluster(tmp_path, weights_dir)
    yield made
    made.close()


def send_requests(sock: zmq.Socket, count: int, *, timeout_ms: int = 120_000) -> list[str]:
    desc, array = image_descriptor(IMAGE)
    params = params_frame(desc, input_size=SIZE)
    ids = []
    for _ in range(count):
        request_id = uuid.uuid4().hex[:16]
        sock.send_multipart([request_header(id=request_id, key=KEY, op="relative_depth", model="vits", timeout_ms=timeout_ms), params, array])
        ids.append(request_id)
    return ids


def collect_replies(sock: zmq.Socket, ids: list[str], *, timeout: float = 90.0) -> dict[str, dict]:
    """Exactly one reply per id, then nothing more for a moment."""
    replies: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(replies) < len(ids):
        remaining = deadline - time.monotonic()
        assert remaining > 0 and sock.poll(remaining * 1000), f"only {len(replies)} of {len(ids)} replies"
        header = msgpack.unpackb(sock.recv_multipart()[0])
        assert header["id"] in ids, header
        assert header["id"] not in replies, f"two replies to {header['id']}"
        replies[header["id"]] = header
    assert not sock.poll(500), "an extra reply arrived"
    return replies


def dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_peer_security(sock, key=KEY, curve=None)  # a keyed broker asks for the key at the handshake
    sock.connect(address)
    return sock


def wait_until_holding(cluster: Cluster, pid: int, *, at_least: int = 2, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in cluster.health()["workers"]:
            if worker["pid"] == pid and worker["in_flight"] >= at_least:
                return worker
        time.sleep(0.01)
    raise AssertionError(f"worker {pid} never held {at_least} requests:\n{cluster.logs()}")


def wait_until_served(cluster: Cluster, pid: int, *, at_least: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w["pid"] == pid and w["served"] >= at_least for w in cluster.health()["workers"]):
            return
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} did not serve {at_least} requests:\n{cluster.logs()}")


# ----------------------------------------------------------------------------- one worker


def test_sigterm_worker_answers_what_it_holds_then_leaves(cluster):
    # One request per batch and 8 held: the victim is sure to hold several when SIGTERM lands.
    victim = cluster.worker("victim", "--max-batch", "1", "--capacity", "8")
    other = cluster.worker("other", "--max-batch", "1", "--capacity", "8")
    health = cluster.wait(2)
    names = {w["pid"]: w["name"] for w in health["workers"]}
    sock = dealer(cluster.clients)
    try:
        ids = send_requests(sock, 40)
        wait_until_holding(cluster, victim.pid)
        victim.popen.send_signal(signal.SIGTERM)
        replies = collect_replies(sock, ids)
    finally:
        sock.close()
    assert {h["status"] for h in replies.values()} == {"ok"}, collections.Counter(h["status"] for h in replies.values())
    assert victim.popen.wait(30) == 0, cluster.logs()
    log = victim.output()
    held = re.search(r"draining: finishing (\d+) requests", log)
    assert held and int(held.group(1)) >= 1, log
    assert "drained; worker" in log
    served_by = collections.Counter(h["worker"] for h in replies.values())
    assert served_by[names[victim.pid]] >= int(held.group(1)), served_by  # what it held, it answered itself
    assert served_by[names[other.pid]] > 0
    broker_log = cluster.broker.output()
    assert f"worker {names[victim.pid]} is draining" in broker_log
    assert f"worker {names[victim.pid]} removed (drained)" in broker_log
    after = cluster.health()
    assert [w["pid"] for w in after["workers"]] == [other.pid]
    assert other.popen.poll() is None


# ----------------------------------------------------------------------------- rolling restart


class Load(threading.Thread):
    """A client in a loop until stopped; any error at all is a failure (no retries: nothing may be lost)."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.stop_event = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.by_worker: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        with Client(self.address, key=KEY, timeout=30, retries=0, input_size=SIZE) as client:
            while not self.stop_event.is_set():
                try:
                    result = client.relative_depth(IMAGE)
                except ZdepthError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    self.ok += 1
                    self.by_worker[result.worker] += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join(60)
        assert not self.is_alive()


def test_rolling_restart_fails_no_request(cluster):
    workers = {name: cluster.worker(name, "--max-batch", "2") for name in ("a", "b")}
    cluster.wait(2)
    loads = [Load(cluster.clients) for _ in range(2)]
    for load in loads:
        load.start()
    try:
        for proc in workers.values():
            wait_until_served(cluster, proc.pid, at_least=3)
        for generation, name in enumerate(("a", "b", "a")):
            old = workers[name]
            before = sum(load.ok for load in loads)
            old.popen.send_signal(signal.SIGTERM)
            assert old.popen.wait(30) == 0, cluster.logs()
            assert "drained; worker" in old.output()
            workers[name] = cluster.worker(f"{name}{generation + 1}", "--max-batch", "2")
            cluster.wait(2, exclude_pids=[old.pid])
            wait_until_served(cluster, workers[name].pid, at_least=3)
            assert sum(load.ok for load in loads) > before
    finally:
        for load in loads:
            load.stop()
    failures = [f for load in loads for f in load.failures]
    assert not failures, failures
    total = sum(load.ok for load in loads)
    assert total >= 20, total
    served_by = sum((load.by_worker for load in loads), collections.Counter())
    assert len(served_by) == 5, served_by  # the load really moved across the old and the new workers
    assert sorted(w["pid"] for w in cluster.health()["workers"]) == sorted(p.pid for p in workers.values())


# ----------------------------------------------------------------------------- the broker


def test_sigterm_broker_answers_every_request_it_holds(cluster):
    for name in ("w1", "w2"):
        cluster.worker(name, "--max-batch", "1", "--capacity", "2")
    cluster.wait(2)
    sock = dealer(cluster.clients)
    try:
        ids = send_requests(sock, 30)
        deadline = time.monotonic() + 30
        while True:  # every request read by the broker (none left in its socket), some queued, some at the workers
            health = cluster.health()
            answered = sum(w["served"] + w["failed"] for w in health["workers"])
            if health["queued_total"] + health["in_flight"] + answered >= len(ids) and health["queued_total"] and health["in_flight"]:
                break
            assert time.monotonic() < deadline, health
        started = time.monotonic()
        cluster.broker.popen.send_signal(signal.SIGTERM)
        replies = collect_replies(sock, ids, timeout=30)
        code = cluster.broker.popen.wait(15)
        took = time.monotonic() - started
    finally:
        sock.close()
    assert code == 0, cluster.logs()
    assert took < 10, took  # in flight work at input 28 finishes well inside the 5 s drain timeout
    statuses = collections.Counter(h["status"] for h in replies.values())
    assert set(statuses) <= {"ok", "overloaded", "worker_lost"}, statuses
    assert statuses["overloaded"] >= 1 and statuses["ok"] >= 1, statuses
    for header in replies.values():
        if header["status"] != "ok":
            assert "shut" in header["message"], header  # says why: the broker is shutting down
    assert "broker stopped" in cluster.broker.output()
