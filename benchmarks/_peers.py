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
"""

from __future__ import annotations

import signal
import time

import _common  # noqa: F401  (puts the repository on sys.path)


def fixed_depth(height: int, width: int):
    import numpy as np

    return np.random.default_rng(0).random((height, width), dtype=np.float32)


def _reply_parts(shape: tuple[int, int], body: str):
    """The fixed reply: (descriptions for a raw-frame header, frames) or one msgpack-numpy body."""
    from zdepth import codec

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

    from zdepth.auth import apply_peer_security

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
