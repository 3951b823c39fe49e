"""Fake peers for trying a real broker without a model or a GPU: a worker reduced to the protocol, a
broker in its own process, and raw clients. Torch-free; the repository's tests and benchmarks use them,
and so can anyone who tests a client, a deployment or a fault drill against zdepth.

- ``FakeWorker``: a protocol-speaking worker on a thread (READY, heartbeats, replies after a fixed
  compute time per batch) with the faults real workers have on bad days: ``stuck`` (holds what it
  got, still heartbeating), ``frozen`` (a suspended host), ``vanish()`` (a killed process).
- ``start_broker``: the broker of this checkout, or of any source tree (an older commit, say), as a
  ``python -c`` process on two free loopback ports; stop it with ``BrokerProcess.stop``.
- ``dealer``, ``send_request``, ``recv_reply``, ``broker_health``, ``wait_workers_ready``: a client
  reduced to frames, to send what a real client never would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

from zdepth.protocol import VERSION, command, error_header, request_header
from zdepth.protocol.auth import apply_peer_security

__all__ = ["BrokerProcess", "FakeWorker", "broker_health", "dealer", "free_port", "recv_reply", "rss_mb", "send_request", "start_broker", "wait_workers_ready"]


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` (VmRSS in /proc, Linux), in MB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ----------------------------------------------------------------------------- a worker reduced to the protocol


@dataclasses.dataclass
class HeldJob:
    """A request the fake worker holds: its REQUEST header and its deadline on the worker's clock."""

    header: dict[str, Any]
    deadline: float


class FakeWorker(threading.Thread):
    """A worker reduced to the protocol, on its own thread: READY, heartbeats, replies by policy.

    It takes up to ``batch`` held requests at a time and answers them
    ``compute_s`` later (a GPU's batch); like the real worker, a request whose
    deadline (``timeout_ms`` on arrival) passed before its batch starts gets
    ``timeout`` and is not computed. Faults, settable at any time:
    ``stuck`` holds every request without answering (a hung GPU that still
    heartbeats; ``release()`` ends it); ``frozen`` stops every message both
    ways (a suspended host); ``vanish()`` closes the socket (a killed process).
    ``key`` goes in READY; with ``plain`` it is also proven at the handshake.
    With ``rejoin`` it announces itself again when the broker says it does not
    know it (as the real worker does). Subclasses change the reply policy by
    overriding ``_arrived`` and ``_work``.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        *,
        key: str | None,
        plain: bool = True,
        name: str = "worker",
        models=("vits",),
        capacity: int = 2,
        batch: int = 1,
        compute_s: float = 0.0,
        stuck: bool = False,
        reply_bytes: int = 16,
        interval_s: float = 0.2,
        rejoin: bool = True,
    ) -> None:
        super().__init__(daemon=True, name=name)
        self.ctx, self.endpoint, self.key, self.plain = ctx, endpoint, key, plain
        self.models, self.capacity, self.batch, self.compute_s = list(models), capacity, batch, compute_s
        self.stuck, self.reply_bytes, self.interval_s, self.rejoin = stuck, reply_bytes, interval_s, rejoin
        self.frozen = False
        self.received: list[dict[str, Any]] = []  # every REQUEST header, in order
        self.computed = 0  # requests that went through a batch
        self.skipped = 0  # requests answered "timeout" without computing: their deadline passed while held
        self.registrations = 0
        self._held: list[HeldJob] = []
        self._busy: tuple[float, list[HeldJob]] | None = None
        self._vanish = threading.Event()
        self._halt = threading.Event()
        self._payload = b"d" * reply_bytes
        self.start()

    def release(self) -> None:
        """A stuck worker recovers: its batch ends (what it held is answered, late or not), then it serves as usual."""
        self.stuck = False

    def vanish(self) -> None:
        self._vanish.set()
        self.join(5)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def counts(self) -> dict[str, int]:
        return {"received": len(self.received), "computed": self.computed, "skipped": self.skipped, "registrations": self.registrations}

    def _ready(self, sock: zmq.Socket) -> None:
        sock.send_multipart([command("ready", key=self.key, models=self.models, capacity=self.capacity, info={"name": self.name, "pid": os.getpid()})])
        self.registrations += 1

    def _reply(self, sock: zmq.Socket, header: dict[str, Any], status: str = "ok", head: bytes | None = None) -> None:
        """REPLY to ``header``'s request: ``head`` (an error header), or an ok header and reply_bytes of payload."""
        if head is None:
            head = msgpack.packb({"v": VERSION, "id": header["id"], "status": "ok", "worker": self.name}, use_bin_type=True)
            body: tuple[bytes, ...] = (head, self._payload)
        else:
            body = (head,)
        sock.send_multipart([command("reply", rid=header["rid"], status=status), *body], copy=False)

    def _arrived(self, header: dict[str, Any], now: float) -> None:
        """A REQUEST came in at ``now``: hold it until a batch takes it."""
        self._held.append(HeldJob(header, now + float(header.get("timeout_ms", 30_000.0)) / 1000))

    def _work(self, sock: zmq.Socket, now: float) -> int:
        """Finish the batch that is due and start the next; returns how long to wait for messages (ms)."""
        if self._busy is not None and now >= self._busy[0]:
            for job in self._busy[1]:
                self._reply(sock, job.header)
            self.computed += len(self._busy[1])
            self._busy = None
        while self._busy is None and self._held and not self.stuck:
            taken, self._held = self._held[: self.batch], self._held[self.batch :]
            late = [job for job in taken if job.deadline <= now]
            for job in late:
                self._reply(sock, job.header, "timeout", error_header(job.header["id"], "timeout", "the deadline passed before the batch could start"))
            self.skipped += len(late)
            jobs = [job for job in taken if job.deadline > now]
            if jobs:
                self._busy = (now + self.compute_s, jobs)
        return 5 if self._busy is None else max(0, min(5, int((self._busy[0] - time.monotonic()) * 1000)))

    def run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        apply_peer_security(sock, key=self.key, curve=None, plain=self.plain)
        sock.connect(self.endpoint)
        self._ready(sock)
        next_beat = 0.0
        try:
            while not self._halt.is_set() and not self._vanish.is_set():
                if self.frozen:
                    time.sleep(0.005)
                    continue
                now = time.monotonic()
                if now >= next_beat:
                    sock.send_multipart([command("heartbeat")])
                    next_beat = now + self.interval_s
                while sock.poll(0):
                    frames = sock.recv_multipart()
                    header = msgpack.unpackb(frames[0], raw=False)
                    if header.get("cmd") == "request":
                        self.received.append(header)
                        self._arrived(header, now)
                    elif header.get("cmd") == "disconnect" and header.get("reason") == "unknown_worker" and self.rejoin:
                        self._held.clear()  # the broker forgot us: what we hold is no longer ours to answer
                        self._ready(sock)
                wait_ms = self._work(sock, time.monotonic())
                if wait_ms:
                    sock.poll(wait_ms)
        finally:
            sock.close(linger=0)


# ----------------------------------------------------------------------------- a broker in its own process


_BROKER_MAIN = """
import dataclasses, json, logging, signal, sys
from zdepth.broker import Broker
from zdepth.config import BrokerConfig, Heartbeat
fields = json.loads(sys.argv[1])
heartbeat = Heartbeat(**fields.pop("heartbeat"))
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
known = {f.name for f in dataclasses.fields(BrokerConfig)}
for name in sorted(set(fields) - known):
    logging.getLogger("zdepth.broker").info("this broker has no setting %r; left out", name)
broker = Broker(BrokerConfig(heartbeat=heartbeat, **{k: v for k, v in fields.items() if k in known}))
broker.bind()
signal.signal(signal.SIGTERM, lambda *_: broker.stop())
broker.run()
"""


@dataclasses.dataclass
class BrokerProcess:
    """A broker in its own process: its client and worker endpoints and its combined output in ``log``."""

    popen: subprocess.Popen
    clients: str
    workers: str
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss_mb(self) -> float | None:
        return rss_mb(self.popen.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal (SIGTERM: drain), wait, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(5)


def start_broker(
    logs: Path, *, key: str | None, source: Path | None = None, env: dict[str, str] | None = None,
    interval_s: float = 0.5, liveness: int = 4, **fields: Any,
) -> BrokerProcess:
    """Start a broker on two free loopback ports and wait until it listens.

    ``fields`` are BrokerConfig fields (a tree whose BrokerConfig lacks one
    leaves it out, and says so in the log). ``source``: run the broker of that
    source tree (its own PYTHONPATH and working directory), else this
    checkout's; ``env``: the child's environment (default: this one, less
    ZDEPTH_* settings). The log is ``logs/broker-<port>.log``.
    """
    client_port, worker_port = free_port(), free_port()
    config = {
        "clients": f"tcp://127.0.0.1:{client_port}",
        "workers": f"tcp://127.0.0.1:{worker_port}",
        "key": key,
        "heartbeat": {"interval_s": interval_s, "liveness": liveness},
        "reconnect_grace_s": 2.0,
        **fields,
    }
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZDEPTH_")}
        env["PYTHONUNBUFFERED"] = "1"
    cwd = None
    if source is not None:
        cwd = Path(source).resolve()
        env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = str(cwd)
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"broker-{client_port}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen([sys.executable, "-c", _BROKER_MAIN, json.dumps(config)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    broker = BrokerProcess(popen, config["clients"], config["workers"], log)
    deadline = time.monotonic() + 30
    while "broker listening" not in broker.output():
        if popen.poll() is not None or time.monotonic() > deadline:
            broker.stop(signal.SIGKILL)
            raise RuntimeError(f"the broker{f' from {source}' if source else ''} did not start:\n{broker.output()}")
        time.sleep(0.05)
    return broker


# ----------------------------------------------------------------------------- raw clients


def dealer(ctx: zmq.Context, endpoint: str, *, key: str | None, plain: bool = True, hwm: int | None = None) -> zmq.Socket:
    """A raw DEALER; with ``plain`` and a key it proves the key at the handshake (key None: a stranger)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if hwm is not None:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    apply_peer_security(sock, key=key, curve=None, plain=plain)
    sock.connect(endpoint)
    return sock


def send_request(sock: zmq.Socket, request_id: str, *, key: str | None, model: str = "vits", timeout_ms: float | None = None, body=(b"params", b"image")) -> None:
    """A depth request for ``model`` (metric if its name has a dash) with ``body`` as its frames, unchecked."""
    op = "metric_depth" if "-" in model else "relative_depth"
    sock.send_multipart([request_header(id=request_id, key=key, op=op, model=model, timeout_ms=timeout_ms), *body], copy=False)


def recv_reply(sock: zmq.Socket, timeout: float = 5.0) -> tuple[dict[str, Any], list[bytes]] | None:
    """The next reply (header map, body frames), or None when none came within ``timeout`` seconds."""
    if not sock.poll(timeout * 1000):
        return None
    frames = sock.recv_multipart()
    return msgpack.unpackb(frames[0], raw=False), frames[1:]


def broker_health(ctx: zmq.Context, endpoint: str, *, key: str | None, plain: bool = True, timeout: float = 5.0) -> dict[str, Any] | None:
    """The broker's health map, or None when it did not answer within ``timeout`` seconds."""
    sock = dealer(ctx, endpoint, key=key, plain=plain)
    try:
        sock.send_multipart([request_header(id="health", key=key, op="health")])
        got = recv_reply(sock, timeout)
        return None if got is None else got[0].get("health")
    finally:
        sock.close(0)


def wait_workers_ready(ctx: zmq.Context, endpoint: str, count: int, *, key: str | None, plain: bool = True, timeout: float = 15.0) -> dict[str, Any]:
    """Health once ``count`` workers are registered and not silent (states an older broker lacks count as ready)."""
    end = time.monotonic() + timeout
    health = None
    while time.monotonic() < end:
        health = broker_health(ctx, endpoint, key=key, plain=plain, timeout=2.0)
        if health is not None:
            ready = [w for w in health.get("workers", []) if w.get("state", "ready") == "ready" and not w.get("draining")]
            if len(ready) >= count:
                return health
        time.sleep(0.05)
    raise RuntimeError(f"no {count} ready worker(s) at {endpoint} within {timeout:.0f} s; last health: {health}")
