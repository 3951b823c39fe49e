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

For the fault benchmarks (``overload.py``, ``broker_faults.py``, ``failover.py``),
built on the fakes of ``zdepth.testing`` (which the tests use too):

- ``protocol_worker``: a ``FakeWorker`` in its own process, which reports
  what it computed.
- ``start_source_broker``: the broker of any source tree (a checkout of an
  older commit, say) as a ``SourceBroker`` process with that tree on
  PYTHONPATH, so two broker implementations can be measured with the same peers.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository on sys.path)
from zdepth import testing
from zdepth.testing import BrokerProcess as SourceBroker
from zdepth.testing import FakeWorker, start_broker

wait_workers_ready = testing.wait_workers_ready  # failover.py calls it from here


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


def protocol_worker(conn, endpoint: str, key: str | None, plain: bool, options: dict) -> None:
    """Target: a ProtocolWorker in this process until the parent sends "stop"; then its counts go back."""
    import zmq

    ctx = zmq.Context()
    worker = FakeWorker(ctx, endpoint, key=key, plain=plain, **options)
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


def has_plain_handshake(source: Path) -> bool:
    """Whether the tree's broker asks a key holder to prove the key at the handshake (it has zdepth's auth module)."""
    return any((Path(source) / "zdepth" / home).exists() for home in ("auth.py", "protocol/auth.py"))


def start_source_broker(source: Path, logs: Path, *, key: str | None, interval_s: float = 0.5, liveness: int = 4, **fields: Any) -> SourceBroker:
    """Run ``zdepth.broker`` from the tree at ``source`` (its own PYTHONPATH and working directory).

    ``fields`` are BrokerConfig fields; those the tree's BrokerConfig lacks are
    left out (and said so in the log).
    """
    return start_broker(logs, key=key, source=source, interval_s=interval_s, liveness=liveness, **fields)
