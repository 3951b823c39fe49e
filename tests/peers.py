"""A real broker process, and workers and clients reduced to the protocol, for fault tests.

The broker runs as its own process (``python -c`` around ``zdepth.broker``, so
any BrokerConfig field can be set); the peers speak PROTOCOL.md over real
loopback sockets from threads of the test process, and can be told to freeze,
vanish, hold requests forever or answer slowly, which real workers do only on
bad days.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq

from procs import REPO, child_env, free_port
from zdepth.protocol.auth import apply_peer_security
from zdepth.protocol import VERSION, command, request_header

KEY = "fault-key"

_BROKER_MAIN = """
import json, logging, sys
from zdepth.broker import run_broker
from zdepth.config import BrokerConfig, Heartbeat
fields = json.loads(sys.argv[1])
heartbeat = Heartbeat(**fields.pop("heartbeat"))
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
from zdepth.signals import on_stop_signals
from zdepth.broker import Broker
with Broker(BrokerConfig(heartbeat=heartbeat, **fields)) as broker:
    broker.bind()
    on_stop_signals(broker.stop, broker.stop, doing="draining")
    broker.run()
"""


@dataclass
class BrokerProcess:
    popen: subprocess.Popen
    clients: str
    workers: str
    log: Path

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                return self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_broker(tmp_path: Path, *, interval_s: float = 0.5, liveness: int = 4, **fields: Any) -> BrokerProcess:
    client_port, worker_port = free_port(), free_port()
    config = {
        "clients": f"tcp://127.0.0.1:{client_port}",
        "workers": f"tcp://127.0.0.1:{worker_port}",
        "key": KEY,
        "heartbeat": {"interval_s": interval_s, "liveness": liveness},
        "reconnect_grace_s": 2.0,
        **fields,
    }
    log = tmp_path / f"broker-{client_port}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen([sys.executable, "-c", _BROKER_MAIN, json.dumps(config)], stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
    broker = BrokerProcess(popen, config["clients"], config["workers"], log)
    deadline = time.monotonic() + 20
    while "broker listening" not in broker.output():
        if popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"broker did not start:\n{broker.output()}")
        time.sleep(0.05)
    return broker


def dealer(ctx: zmq.Context, endpoint: str, *, key: str | None = KEY) -> zmq.Socket:
    """A raw DEALER that proves ``key`` at the handshake (None: proves nothing, as a stranger)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_peer_security(sock, key=key, curve=None)
    sock.connect(endpoint)
    return sock


def send_request(sock: zmq.Socket, request_id: str, *, key: str = KEY, model: str = "vits", timeout_ms: float | None = None, body=(b"params", b"image")) -> None:
    op = "metric_depth" if "-" in model else "relative_depth"
    sock.send_multipart([request_header(id=request_id, key=key, op=op, model=model, timeout_ms=timeout_ms), *body])


def recv_reply(sock: zmq.Socket, timeout: float = 5.0) -> tuple[dict[str, Any], list[bytes]]:
    if not sock.poll(timeout * 1000):
        raise AssertionError(f"no reply within {timeout} s")
    frames = sock.recv_multipart()
    return msgpack.unpackb(frames[0], raw=False), frames[1:]


def health(ctx: zmq.Context, broker: BrokerProcess) -> dict[str, Any]:
    sock = dealer(ctx, broker.clients)
    try:
        sock.send_multipart([request_header(id="health", key=KEY, op="health")])
        return recv_reply(sock)[0]["health"]
    finally:
        sock.close()


class PeerWorker(threading.Thread):
    """A protocol-speaking worker on its own thread: READY, heartbeats, and replies by policy.

    ``reply_after`` seconds after a request arrives it answers (None: never, a stuck GPU);
    ``frozen`` stops every message both ways (a suspended host); ``vanish()`` closes the
    socket (a killed process).
    """

    running: list["PeerWorker"] = []  # stopped by the tests' context fixture before the context goes

    def __init__(self, ctx: zmq.Context, endpoint: str, *, name: str, models=("vits",), capacity: int = 2, reply_after: float | None = 0.0, reply_bytes: int = 16, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True, name=name)
        self.ctx, self.endpoint, self.models, self.capacity = ctx, endpoint, list(models), capacity
        self.reply_after, self.reply_bytes, self.interval_s = reply_after, reply_bytes, interval_s
        self.received: list[dict[str, Any]] = []
        self.frozen = False
        self._vanish = threading.Event()
        self._halt = threading.Event()
        self._held: list[tuple[float, dict[str, Any]]] = []
        PeerWorker.running.append(self)
        self.start()

    def run(self) -> None:
        sock = dealer(self.ctx, self.endpoint)
        sock.send_multipart([command("ready", key=KEY, models=self.models, capacity=self.capacity, info={"name": self.name})])
        next_beat = 0.0
        payload = b"d" * self.reply_bytes
        try:
            while not self._halt.is_set() and not self._vanish.is_set():
                if self.frozen:
                    time.sleep(0.01)
                    continue
                now = time.monotonic()
                if now >= next_beat:
                    sock.send_multipart([command("heartbeat")])
                    next_beat = now + self.interval_s
                while sock.poll(0):
                    frames = sock.recv_multipart()
                    header = msgpack.unpackb(frames[0], raw=False)
                    if header["cmd"] == "request":
                        self.received.append(header)
                        if self.reply_after is not None:
                            self._held.append((now + self.reply_after, header))
                due = [h for h in self._held if h[0] <= now]
                for item in due:
                    self._held.remove(item)
                    header = item[1]
                    reply = msgpack.packb({"v": VERSION, "id": header["id"], "status": "ok", "worker": self.name}, use_bin_type=True)
                    sock.send_multipart([command("reply", rid=header["rid"], status="ok"), reply, payload], copy=False)
                sock.poll(5)
        finally:
            sock.close(linger=0)

    def vanish(self) -> None:
        self._vanish.set()
        self.join(5)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    @classmethod
    def stop_all(cls) -> None:
        while cls.running:
            cls.running.pop().stop()


def pid_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def env_without_key() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ZDEPTH_")}
