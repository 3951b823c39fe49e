"""Server-side peers for the benchmarks, each run in its own (spawned) process.

- ``direct_echo``: a ROUTER that answers each client request itself with a
  fixed depth map: "direct ZeroMQ", the floor that the broker is compared with.
- ``echo_worker``: a minimal protocol-speaking worker (READY, heartbeats,
  REPLY) behind the real broker, answering with the same fixed depth map; the
  difference to ``direct_echo`` is the broker hop alone.
- ``stub_worker``: the real ``zdepth.worker.Worker`` with an injected engine
  that returns the fixed depth map: the real worker's overhead (decode, batching
  thread, reply building) without a model.
- ``model_worker``: the real Worker with the real Engine.

Each reports readiness through ``conn`` and runs until SIGTERM.

For the fault benchmarks (``overload.py``, ``broker_faults.py``):

- ``ProtocolWorker``: a worker reduced to the protocol on a thread, with a
  fixed compute time per batch and the faults real workers have on bad days
  (frozen, vanished, stuck holding what it got); ``protocol_worker`` runs one
  in its own process and reports what it computed.
- ``SourceBroker``: the broker of any source tree (a checkout of an older
  commit, say) as a ``python -c`` process with that tree on PYTHONPATH, so two
  broker implementations can be measured with the same peers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository on sys.path)


def fixed_depth(height: int, width: int):
    import numpy as np

    return np.random.default_rng(0).random((height, width), dtype=np.float32)


def _reply_parts(shape: tuple[int, int], body: str):
    """The fixed reply: (descriptions for a raw-frame header, frames) or one msgpack-numpy body."""
    from zdepth.protocol import codec

    depth = fixed_depth(*shape)
    if body == "msgpack-numpy":
        return [], [codec.pack_body({"depth": depth})], depth
    descs, buffers = codec.array_frames({"depth": depth})
    return descs, buffers, depth


def direct_echo(conn, shape: tuple[int, int], body: str = "raw") -> None:
    """ROUTER on a random loopback port; each request [header, params, image] gets [reply header, depth]."""
    import zmq

    from zdepth import protocol

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    descs, frames, depth = _reply_parts(shape, body)
    low, high = float(depth.min()), float(depth.max())
    conn.send(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    conn.close()
    while True:  # until SIGTERM ends the process
        message = sock.recv_multipart(copy=False)
        identity, head = message[0], message[1]
        header = protocol.parse_request_header(head.buffer)  # the same check the broker makes
        reply = protocol.reply_header(header.id, model="vits", worker="echo", min=low, max=high, timings={}, arrays=descs)
        sock.send_multipart([identity, reply, *frames], copy=False)


def c_proxy(conn) -> None:
    """libzmq's own forwarder (``zmq.proxy``: ROUTER front, DEALER back), no Python per message:
    the cost of an extra hop by itself, to set the Python broker's cost against."""
    import zmq

    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for sock in (front, back):
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:*")
    conn.send((front.getsockopt_string(zmq.LAST_ENDPOINT), back.getsockopt_string(zmq.LAST_ENDPOINT)))
    conn.close()
    zmq.proxy(front, back)  # until SIGTERM ends the process


def _echo_dealer(endpoint: str, shape: tuple[int, int], key: str | None = None):
    """(context, a DEALER connected to ``endpoint``, and the fixed raw reply: descriptions, frames, min, max).

    With a ``key`` the DEALER proves it at the handshake (PLAIN), as a broker with a key asks.
    """
    import zmq

    from zdepth.protocol.auth import apply_peer_security

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_peer_security(sock, key=key, curve=None)
    sock.connect(endpoint)
    descs, frames, depth = _reply_parts(shape, "raw")
    return ctx, sock, descs, frames, float(depth.min()), float(depth.max())


def dealer_echo(conn, endpoint: str, shape: tuple[int, int]) -> None:
    """The echo behind ``c_proxy``: a DEALER getting [client id, header, params, image]."""
    from zdepth import protocol

    _, sock, descs, frames, low, high = _echo_dealer(endpoint, shape)
    conn.send("ready")
    conn.close()
    while True:  # until SIGTERM ends the process
        message = sock.recv_multipart(copy=False)
        header = protocol.parse_request_header(message[1].buffer)
        reply = protocol.reply_header(header.id, model="vits", worker="echo", min=low, max=high, timings={}, arrays=descs)
        sock.send_multipart([message[0], reply, *frames], copy=False)


def echo_worker(conn, endpoint: str, key: str | None, shape: tuple[int, int], models=("vits",), capacity: int = 16) -> None:
    """A worker reduced to the protocol: READY, a heartbeat a second, a fixed REPLY per REQUEST."""
    from zdepth import protocol

    ctx, sock, descs, frames, low, high = _echo_dealer(endpoint, shape, key)
    sock.send_multipart([protocol.command(protocol.READY, key=key, models=list(models), capacity=capacity, info={"name": "echo-worker"})])
    conn.send("ready")
    conn.close()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    next_beat = time.monotonic() + 1.0
    while not stop:
        if sock.poll(250):
            message = sock.recv_multipart(copy=False)
            header = protocol.parse_command(message[0].buffer)
            if header["cmd"] == protocol.REQUEST:
                reply = protocol.reply_header(header["id"], model=header["model"], worker="echo-worker", min=low, max=high, timings={}, arrays=descs)
                sock.send_multipart([protocol.command(protocol.REPLY, rid=header["rid"], status=protocol.STATUS_OK), reply, *frames], copy=False)
            elif header["cmd"] == protocol.DISCONNECT:
                break
        if time.monotonic() >= next_beat:
            sock.send_multipart([protocol.command(protocol.HEARTBEAT)])
            next_beat = time.monotonic() + 1.0
    sock.close(0)
    ctx.term()


class FixedEngine:
    """An engine that answers every image with one fixed depth map: the Worker without a model."""

    device = "cpu"
    precision = "stub"
    cuda_graphs = decodes_jpeg = staged = False  # what zdepth.worker.engine.Engine asks of every engine

    def __init__(self, shape: tuple[int, int]) -> None:
        self.depth = fixed_depth(*shape)

    def load(self, model_id: str) -> None:
        return None

    def infer(self, images, model_id, *, input_size=518, max_depth=None):
        return [self.depth for _ in images]


def _serve_worker(worker, conn) -> None:
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    conn.send("ready")
    conn.close()
    worker.run()


def stub_worker(conn, endpoint: str, key: str | None, shape: tuple[int, int], max_wait_ms: float = 2.0, models=("vits",)) -> None:
    from zdepth.config import WorkerConfig
    from zdepth.worker import Worker

    config = WorkerConfig(broker=endpoint, models=tuple(models), key=key, warmup_sizes=(), max_wait_ms=max_wait_ms)
    _serve_worker(Worker(config, engine=FixedEngine(shape)), conn)


def model_worker(conn, endpoint: str, key: str | None, options: dict) -> None:
    """The real Worker and Engine. ``options``: WorkerConfig fields, plus ``threads`` (torch CPU threads)."""
    options = dict(options)
    threads = options.pop("threads", None)
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from zdepth.config import WorkerConfig
    from zdepth.worker import Worker

    config = WorkerConfig(broker=endpoint, key=key, **options)
    _serve_worker(Worker(config), conn)


def launch(target, *args, name: str):
    """Start ``target(conn, *args)`` in a spawned process; ``wait`` for what it reports."""
    ctx = _common.spawn_context()
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=target, args=(child, *args), daemon=True, name=name)
    process.start()
    child.close()
    return process, parent


def wait(process, pipe, *, timeout: float = 120.0):
    if not pipe.poll(timeout):
        process.kill()
        raise RuntimeError(f"{process.name} did not start within {timeout:.0f} s")
    return pipe.recv()


def start(target, *args, name: str, timeout: float = 120.0):
    """Run ``target(conn, *args)`` in a spawned process; returns (process, what it reported)."""
    process, pipe = launch(target, *args, name=name)
    return process, wait(process, pipe, timeout=timeout)


# ----------------------------------------------------------------------------- fault benchmarks: a protocol worker


@dataclasses.dataclass
class HeldJob:
    header: dict[str, Any]
    deadline: float


class ProtocolWorker(threading.Thread):
    """A worker reduced to the protocol, on its own thread: READY, heartbeats, replies by policy.

    It takes up to ``batch`` held requests at a time and answers them
    ``compute_s`` later (a GPU's batch); like the real worker, a request whose
    deadline (``timeout_ms`` on arrival) passed before its batch starts gets
    ``timeout`` and is not computed. Faults, settable at any time:
    ``stuck`` holds every request without answering (a hung GPU that still
    heartbeats; ``release()`` ends it); ``frozen`` stops every message both
    ways (a suspended host); ``vanish()`` closes the socket (a killed process).
    ``key`` goes in READY; with ``plain`` it is also proven at the handshake.
    """

    def __init__(
        self,
        ctx,
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
    ) -> None:
        super().__init__(daemon=True, name=name)
        self.ctx, self.endpoint, self.key, self.plain = ctx, endpoint, key, plain
        self.models, self.capacity, self.batch, self.compute_s = list(models), capacity, batch, compute_s
        self.stuck, self.reply_bytes, self.interval_s = stuck, reply_bytes, interval_s
        self.frozen = False
        self.received: list[dict[str, Any]] = []  # every REQUEST header, in order
        self.computed = 0  # requests that went through a batch
        self.skipped = 0  # requests answered "timeout" without computing: their deadline passed while held
        self.registrations = 0
        self._held: list[HeldJob] = []
        self._busy: tuple[float, list[HeldJob]] | None = None
        self._vanish = threading.Event()
        self._halt = threading.Event()
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

    def _ready(self, sock) -> None:
        from zdepth.protocol import command

        sock.send_multipart([command("ready", key=self.key, models=self.models, capacity=self.capacity, info={"name": self.name, "pid": os.getpid()})])
        self.registrations += 1

    def run(self) -> None:
        import msgpack
        import zmq

        from zdepth.protocol.auth import apply_peer_security
        from zdepth.protocol import VERSION, command, error_header

        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        apply_peer_security(sock, key=self.key, curve=None, plain=self.plain)
        sock.connect(self.endpoint)
        self._ready(sock)
        payload = b"d" * self.reply_bytes
        next_beat = 0.0

        def reply(job: HeldJob, status: str, head: bytes, *body) -> None:
            sock.send_multipart([command("reply", rid=job.header["rid"], status=status), head, *body], copy=False)

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
                        self._held.append(HeldJob(header, now + float(header.get("timeout_ms", 30_000.0)) / 1000))
                    elif header.get("cmd") == "disconnect" and header.get("reason") == "unknown_worker":
                        self._held.clear()  # the broker forgot us: what we hold is no longer ours to answer
                        self._ready(sock)
                now = time.monotonic()
                if self._busy is not None and now >= self._busy[0]:
                    for job in self._busy[1]:
                        head = msgpack.packb({"v": VERSION, "id": job.header["id"], "status": "ok", "worker": self.name}, use_bin_type=True)
                        reply(job, "ok", head, payload)
                    self.computed += len(self._busy[1])
                    self._busy = None
                while self._busy is None and self._held and not self.stuck:
                    taken, self._held = self._held[: self.batch], self._held[self.batch :]
                    late = [job for job in taken if job.deadline <= now]
                    for job in late:
                        reply(job, "timeout", error_header(job.header["id"], "timeout", "the deadline passed before the batch could start"))
                    self.skipped += len(late)
                    jobs = [job for job in taken if job.deadline > now]
                    if jobs:
                        self._busy = (now + self.compute_s, jobs)
                wait_ms = 5 if self._busy is None else max(0, min(5, int((self._busy[0] - time.monotonic()) * 1000)))
                if wait_ms:
                    sock.poll(wait_ms)
        finally:
            sock.close(linger=0)


def protocol_worker(conn, endpoint: str, key: str | None, plain: bool, options: dict) -> None:
    """Target: a ProtocolWorker in this process until the parent sends "stop"; then its counts go back."""
    import zmq

    ctx = zmq.Context()
    worker = ProtocolWorker(ctx, endpoint, key=key, plain=plain, **options)
    conn.send("ready")
    try:
        conn.recv()
    except EOFError:
        pass
    worker.stop()
    conn.send(worker.counts())
    conn.close()
    ctx.destroy(linger=0)


def start_protocol_worker(endpoint: str, key: str | None, plain: bool, options: dict, *, name: str = "protocol-worker"):
    """(process, pipe): a ProtocolWorker in a spawned process; ``stop_protocol_worker`` gets its counts."""
    ctx = _common.spawn_context()
    parent, child = ctx.Pipe()
    process = ctx.Process(target=protocol_worker, args=(child, endpoint, key, plain, options), daemon=True, name=name)
    process.start()
    child.close()
    wait(process, parent, timeout=60)
    return process, parent


def stop_protocol_worker(process, pipe, timeout: float = 10.0) -> dict[str, int] | None:
    counts = None
    try:
        pipe.send("stop")
        if pipe.poll(timeout):
            counts = pipe.recv()
    except (OSError, EOFError):
        pass
    _common.stop_process(process)
    return counts


# ----------------------------------------------------------------------------- fault benchmarks: any tree's broker


_SOURCE_BROKER_MAIN = """
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


def has_plain_handshake(source: Path) -> bool:
    """Whether the tree's broker asks a key holder to prove the key at the handshake (zdepth/auth.py)."""
    return (Path(source) / "zdepth" / "auth.py").exists()


@dataclasses.dataclass
class SourceBroker:
    """The broker of the tree at ``source``, in its own process, on two free loopback ports."""

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
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(5)


def rss_mb(pid: int) -> float | None:
    """VmRSS of ``pid`` in MB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def start_source_broker(source: Path, logs: Path, *, key: str | None, interval_s: float = 0.5, liveness: int = 4, **fields: Any) -> SourceBroker:
    """Run ``zdepth.broker`` from the tree at ``source`` (its own PYTHONPATH and working directory).

    ``fields`` are BrokerConfig fields; those the tree's BrokerConfig lacks are
    left out (and said so in the log).
    """
    client_port, worker_port = _common.free_port(), _common.free_port()
    config = {
        "clients": f"tcp://127.0.0.1:{client_port}",
        "workers": f"tcp://127.0.0.1:{worker_port}",
        "key": key,
        "heartbeat": {"interval_s": interval_s, "liveness": liveness},
        "reconnect_grace_s": 2.0,
        **fields,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDEPTH_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(Path(source).resolve()), PYTHONUNBUFFERED="1")
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"broker-{client_port}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen([sys.executable, "-c", _SOURCE_BROKER_MAIN, json.dumps(config)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(source).resolve())
    broker = SourceBroker(popen, config["clients"], config["workers"], log)
    deadline = time.monotonic() + 30
    while "broker listening" not in broker.output():
        if popen.poll() is not None or time.monotonic() > deadline:
            broker.stop(signal.SIGKILL)
            raise RuntimeError(f"the broker from {source} did not start:\n{broker.output()}")
        time.sleep(0.05)
    return broker


# ----------------------------------------------------------------------------- fault benchmarks: raw clients


def raw_dealer(ctx, endpoint: str, *, key: str | None, plain: bool = True, hwm: int | None = None):
    """A client DEALER; with ``plain`` and a key it proves the key at the handshake (key None: a stranger)."""
    import zmq

    from zdepth.protocol.auth import apply_peer_security

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if hwm is not None:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    apply_peer_security(sock, key=key, curve=None, plain=plain)
    sock.connect(endpoint)
    return sock


def send_request(sock, request_id: str, *, key: str | None, model: str = "vits", timeout_ms: float | None = None, body=(b"params", b"image")) -> None:
    from zdepth.protocol import request_header

    op = "metric_depth" if "-" in model else "relative_depth"
    sock.send_multipart([request_header(id=request_id, key=key, op=op, model=model, timeout_ms=timeout_ms), *body], copy=False)


def recv_reply(sock, timeout: float = 5.0) -> tuple[dict[str, Any], list[bytes]] | None:
    """The next reply (header map, body frames), or None when none came within ``timeout`` seconds."""
    import msgpack

    if not sock.poll(timeout * 1000):
        return None
    frames = sock.recv_multipart()
    return msgpack.unpackb(frames[0], raw=False), frames[1:]


def broker_health(ctx, endpoint: str, *, key: str | None, plain: bool = True, timeout: float = 5.0) -> dict[str, Any] | None:
    from zdepth.protocol import request_header

    sock = raw_dealer(ctx, endpoint, key=key, plain=plain)
    try:
        sock.send_multipart([request_header(id="health", key=key, op="health")])
        got = recv_reply(sock, timeout)
        return None if got is None else got[0].get("health")
    finally:
        sock.close(0)


def wait_workers_ready(ctx, endpoint: str, count: int, *, key: str | None, plain: bool = True, timeout: float = 15.0) -> dict[str, Any]:
    """Health once ``count`` workers are registered and not silent (states the older broker lacks count as ready)."""
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
