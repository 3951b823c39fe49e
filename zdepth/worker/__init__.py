"""The worker: one process per GPU, serving depth requests that its brokers hand it.

An I/O loop, so that heartbeats keep flowing while the GPU is busy, and a
pipeline of three threads, so that the GPU does not wait for the host::

    broker(s) <--DEALER each--> I/O loop (run(), the caller's thread)
                          |  owns the sockets: READY, heartbeats, liveness,
                          |  reconnect with back-off, drain on stop(), per broker
                   jobs   v                                      ^  results + a wake-up byte
        prepare thread: wait for the decode, engine.prepare      |
                          v  prepared images                     |
        compute thread: collect_batch -> engine.run (batch N)    |
                          v  batches in flight                   |
        reply thread:   engine.collect -> reply frames ----------+

While batch N runs on the device, the images of batch N+1 are decoded (by a
small pool as they arrive; cv2 releases the GIL), uploaded and preprocessed,
and the replies of batch N-1 are built. An engine that offers only ``infer``
runs whole on the compute thread. With ``WorkerConfig.pipeline`` off, one
compute thread does each batch's steps in turn (kept for comparison,
benchmarks/overlap.py). Models are loaded and warmed up on the compute
thread, which alone calls ``engine.run`` (CUDA graphs and compiled code stay
on one thread); the engine's steps are made to be called from these threads
(see zdepth.engine).

Only the I/O loop touches ZeroMQ. Finished replies come back through a queue,
with one byte written to a socket pair that the I/O loop polls beside the
DEALER, so replies go out at once without busy polling. (A socket pair rather
than an inproc PAIR: any thread, and a signal handler, may write to it, where
a ZeroMQ socket belongs to one thread.) JPEGs that an engine decodes on the
GPU (``engine.decodes_jpeg``) stay encoded until they are prepared.

Reliability follows the ZeroMQ Guide's Paranoid Pirate worker: a broker silent
for ``heartbeat.expiry_s`` is presumed dead; the worker closes its socket,
waits with exponential back-off and jitter, connects a fresh one and
announces itself again. Requests from a dropped connection are abandoned (the
broker re-queues or fails them), never answered late on the new one.

With several brokers (``WorkerConfig.brokers``, for a broker that is not a
single point of failure) each has its own connection doing all of the above,
and the device is shared: see ``Worker`` for the capacity each is announced.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from zmq.utils.monitor import recv_monitor_message

from zdepth import __version__, protocol
from zdepth.protocol import auth
from zdepth.protocol import codec
from zdepth.protocol import images as imageio
from zdepth.engine.batching import collect_batch, padded_batches
from zdepth.config import DEFAULT_MAX_BATCH, WorkerConfig
from zdepth.protocol.curve import apply_client
from zdepth.errors import BadRequest, ConfigError, InternalError, ServiceError, Unauthorized, UnknownModel, WeightsNotFound, ZdepthError
from zdepth.metrics import MetricsBindError, WorkerMetrics, cuda_memory, serve as serve_metrics
from zdepth.backoff import backoff_delay
from zdepth.models import DEFAULT_INPUT_SIZE, MAX_INPUT_SIZE, is_metric_model
from zdepth.pointcloud import Intrinsics, depth_to_points
from zdepth.signals import on_stop_signals
from zdepth.wakeup import Wakeup
from zdepth.supervisor import EXIT_ADDRESS, EXIT_CONFIG, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_MISSING, EXIT_OK

__all__ = ["Worker", "exit_status", "run_worker"]

logger = logging.getLogger(__name__)

MAX_NETWORK_PIXELS = 4 * MAX_INPUT_SIZE**2  # the largest input size at 4:1; beyond it a request is refused
FLUSH_LINGER_MS = 1000  # after a drain, how long close() may spend sending the last replies
DRAIN_GRACE_S = 0.25  # after DISCONNECT, requests the broker sent before reading it may still arrive
MAX_READS_PER_WAKE = 64  # broker messages read before replies get their turn again
CPU_MAX_BATCH = 4  # a CPU worker's largest batch unless set (see cpu_plan)
DECODE_THREADS = min(4, os.cpu_count() or 1)
KEEPALIVE = {zmq.TCP_KEEPALIVE: 1, zmq.TCP_KEEPALIVE_IDLE: 30, zmq.TCP_KEEPALIVE_INTVL: 10, zmq.TCP_KEEPALIVE_CNT: 3}


# ----------------------------------------------------------------------------- jobs and messages


@dataclass(eq=False)
class Job:
    """One request between the I/O loop and the compute thread.

    ``image`` is the image frame's payload (encoded bytes or a raw array
    view); ``decoded`` its HxWx3 BGR uint8 pixels, on their way from the
    decode pool. ``link`` is the broker connection it came on, where its
    reply goes; ``generation`` is that link's generation then: a job from an
    older connection (the link dropped or reconnected since) is abandoned.
    """

    rid: Any
    request_id: str | None
    op: str
    model: str
    params: codec.DepthParams
    image: Any
    received: float  # time.monotonic()
    deadline: float | None
    generation: int
    decoded: Future[np.ndarray] | None = None
    done: bool = False
    status: str | None = None  # the reply's status ("ok" or an error code) once there is one; None: abandoned
    held_bytes: int = 0  # counted against WorkerConfig.max_held_bytes while the job is held
    link: Any = None  # the _BrokerLink it came on

    @property
    def batch_key(self) -> Hashable:
        """Jobs share a forward pass only with the same model and network input size."""
        return (self.model, self.params.input_size or DEFAULT_INPUT_SIZE)


class _Stop:
    """Tells the compute thread to return; its key matches no job's, so it is never batched with one."""

    @property
    def batch_key(self) -> Hashable:
        return id(self)


@dataclass(frozen=True)
class CpuPlan:
    """How a CPU worker uses its cores: torch's intra-op threads, and the largest batch."""

    threads: int
    max_batch: int
    why: str  # for the log


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def cpu_plan(config: WorkerConfig, cores: int | None = None) -> CpuPlan:
    """Threads and batching for a worker whose forward pass runs on the CPU.

    The forward pass gets every core but those the worker's own threads
    (decoding, preparing the next batch, I/O) and a broker on the same box
    need: one, and one more per 16 cores. OpenMP threads wait for each other
    at every operator, so one pushed off its core by another busy thread
    stalls them all: on 2 shared cores, 2 threads ran a vits forward pass 3
    to 17 times slower than 1 (measured with other work on the box). ``OMP_NUM_THREADS``,
    when set, is an operator's explicit choice and wins over the core count;
    ``config.threads`` wins over both. Batches: up to 4 (a batch of 4 costs
    about 10% less a frame than 4 batches of 1 on the CPU, and a bigger one
    gains little more while every frame in it waits for the whole batch);
    ``config.max_batch`` wins.
    """
    cores = cores or available_cores()
    if config.threads is not None:
        threads, why = config.threads, "as configured"
    elif (env := os.environ.get("OMP_NUM_THREADS", "").strip()).isdigit() and int(env) > 0:
        threads, why = int(env), "from OMP_NUM_THREADS"
    else:
        threads = max(1, cores - 1 - cores // 16)
        why = f"{cores} cores, {cores - threads} left to decoding, I/O and the broker"
    return CpuPlan(threads, config.max_batch or CPU_MAX_BATCH, why)


def ready_frame(config: WorkerConfig, *, name: str, device: str, precision: str | None, threads: int | None = None) -> bytes:
    info = {
        "name": name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": device,
        "precision": precision,
        "version": __version__,
        "max_batch": config.max_batch,
        "pipeline": config.pipeline,
    }
    if threads is not None:
        info["threads"] = threads
    return protocol.command(
        protocol.READY, key=config.key, models=list(config.models), capacity=config.effective_capacity, info=info
    )


def error_frames(rid: Any, request_id: str | None, code: str, message: str) -> list[bytes]:
    """A REPLY carrying an error: the broker forwards the second frame to the client."""
    return [protocol.command(protocol.REPLY, rid=rid, status=code), protocol.error_header(request_id, code, message)]


def reply_frames(
    job: Job, depth: np.ndarray, *, worker: str, timings: dict[str, float], batch: int, depth_range: tuple[float, float] | None = None
) -> list[Any]:
    """A REPLY with the depth map (and points for a point cloud) as raw array frames.

    ``depth``: HxW from the engine, float32 (or float16 already cast on the
    device); sent as float32 or float16 as the request asked. ``min``/``max``
    are taken before any cast: ``depth_range`` when the engine took them,
    else here.
    """
    if depth.dtype != np.float16:
        depth = np.asarray(depth, dtype=np.float32)
    arrays = {"depth": depth.astype(codec.DEPTH_DTYPES[job.params.depth_dtype], copy=False)}
    if job.op == protocol.OP_POINTCLOUD:
        arrays["points"], _ = depth_to_points(depth.astype(np.float32, copy=False), Intrinsics(*job.params.intrinsics))
    descs, buffers = codec.array_frames(arrays)
    if depth_range is None and depth.dtype == np.float16:
        raise ValueError("a float16 depth map needs the min and max of its float32 values")
    low, high = depth_range if depth_range is not None else _nan_min_max(depth)
    header = protocol.reply_header(
        job.request_id,
        model=job.model,
        worker=worker,
        min=low,
        max=high,
        timings=timings,
        batch=batch,
        arrays=descs,
    )
    return [protocol.command(protocol.REPLY, rid=job.rid, status=protocol.STATUS_OK), header, *buffers]


def max_pixels(config: WorkerConfig) -> int:
    """The most pixels an image may have: ``config.max_pixels``, by default the most whose float32
    depth map fits one reply message (4096 x 4096 at 64 MiB), so that every image accepted can be
    answered; never more than ``imageio.DEFAULT_MAX_PIXELS``."""
    if config.max_pixels is not None:
        return config.max_pixels
    return min(config.max_message_bytes // np.dtype(np.float32).itemsize, imageio.DEFAULT_MAX_PIXELS)


def held_bytes(image: Any, info: imageio.ImageInfo) -> int:
    """What holding a request's image may cost at its peak: the frame as received, plus what
    decoding it allocates at once (read from its header by ``imageio.inspect_image``: a 16-bit PNG
    costs 12 bytes a pixel, an 8-bit JPEG 6)."""
    return memoryview(image).nbytes + info.decode_bytes


def check_reply_size(job: Job, height: int, width: int, limit: int) -> None:
    """BadRequest when a reply frame would exceed the message limit: the broker would drop the
    connection of a worker that sent it (and every request that worker held would be re-queued)."""
    frames = {"depth": height * width * np.dtype(codec.DEPTH_DTYPES[job.params.depth_dtype]).itemsize}
    if job.op == protocol.OP_POINTCLOUD:
        frames["points"] = height * width * 3 * 4
    name, size = max(frames.items(), key=lambda item: item[1])
    if size > limit:
        hint = "compute the point cloud on the client (on_server=False)" if name == "points" else "use depth_dtype='float16'"
        raise BadRequest(
            f"the reply's {name} array for a {width}x{height} image would be {size} bytes, above the message limit of {limit}; "
            f"send a smaller image or {hint}"
        )


def check_network_size(job: Job, height: int, width: int) -> None:
    """BadRequest for an image so elongated that the network input would be absurd.

    The short side is scaled to ``input_size`` and the long side follows, so a 2x600 image at 518
    becomes a 518x155400 input: gigabytes and hours from a few bytes. Refused beyond the pixels
    of the largest input size at 4:1 (``4 * MAX_INPUT_SIZE**2``).
    """
    from depth_anything_v2.transforms import network_input_size  # imports torch: only once a batch runs

    input_size = job.params.input_size or DEFAULT_INPUT_SIZE
    net_height, net_width = network_input_size(height, width, input_size)
    if net_height * net_width > MAX_NETWORK_PIXELS:
        raise BadRequest(
            f"a {width}x{height} image at input_size {input_size} would be a {net_width}x{net_height} network input, "
            f"above the limit of {MAX_NETWORK_PIXELS} pixels; crop or pad such an elongated image, or lower input_size"
        )


def _nan_min_max(depth: np.ndarray) -> tuple[float, float]:
    """Min and max ignoring NaN (NaN only if all of it is), without numpy's all-NaN warning."""
    low, high = float(depth.min()), float(depth.max())
    if math.isnan(low) or math.isnan(high):
        finite = depth[~np.isnan(depth)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)
    return low, high


def parse_request(
    header: dict[str, Any], body: list[zmq.Frame], *, models: tuple[str, ...], now: float, generation: int, max_image_bytes: int
) -> Job:
    """A Job from a broker REQUEST; raises a ServiceError that fails only this request."""
    op = header.get("op")
    if op not in protocol.MODEL_OPS:
        raise BadRequest(f"op {op!r} is not a model op; workers serve {sorted(protocol.MODEL_OPS)}")
    model = header.get("model")
    if model is None:  # the broker normally picks one; take the first that fits
        model = next((m for m in models if protocol.op_accepts_model(op, m)), None)
    if model not in models:
        raise UnknownModel(f"this worker serves {list(models)}, not {model!r}", details={"served": list(models)})
    if not protocol.op_accepts_model(op, model):
        kind = "metric (such as 'vits-hypersim')" if op != protocol.OP_RELATIVE else "relative (such as 'vits')"
        raise BadRequest(f"op {op!r} needs a {kind} model; {model!r} is not one")
    if len(body) != 2:
        raise BadRequest(f"a {op} request has two body frames (params, image), got {len(body)}")
    params = codec.parse_params(op, body[0].buffer)
    image = codec.decode_image_frame(params.image, body[1].buffer, max_bytes=max_image_bytes)
    timeout_ms = header.get("timeout_ms")
    has_timeout = isinstance(timeout_ms, (int, float)) and not isinstance(timeout_ms, bool) and math.isfinite(timeout_ms)
    request_id = header.get("id")
    return Job(
        rid=header.get("rid"),
        request_id=request_id if isinstance(request_id, str) else None,
        op=op,
        model=model,
        params=params,
        image=image,
        received=now,
        deadline=now + timeout_ms / 1000 if has_timeout else None,
        generation=generation,
    )


class Traffic:
    """What the worker answered since the last summary: one INFO line per interval instead of one per request.

    ``reply`` is called by the I/O loop for every reply sent, ``batch`` by
    whichever thread runs a forward pass; ``summary`` returns the line (None
    when there was no traffic) and starts a new interval.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._codes: dict[str, int] = {}
        self._latencies_ms: list[float] = []
        self._batches: list[int] = []

    def reply(self, status: str, latency_ms: float) -> None:
        with self._lock:
            self._codes[status] = self._codes.get(status, 0) + 1
            self._latencies_ms.append(latency_ms)

    def batch(self, size: int) -> None:
        with self._lock:
            self._batches.append(size)

    def summary(self, elapsed_s: float) -> str | None:
        with self._lock:
            codes, latencies, batches = self._codes, self._latencies_ms, self._batches
            self._codes, self._latencies_ms, self._batches = {}, [], []
        total = sum(codes.values())
        if not total and not batches:
            return None
        ok = codes.pop("ok", 0)
        errors = ", ".join(f"{count} {code}" for code, count in sorted(codes.items())) or "no errors"
        line = f"last {elapsed_s:.1f} s: {total} requests ({total / max(elapsed_s, 1e-9):.1f}/s), {ok} ok, {errors}"
        if latencies:
            p50, p99 = np.percentile(latencies, [50, 99])
            line += f"; worker latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        if batches:
            line += f"; {len(batches)} batches, mean size {sum(batches) / len(batches):.2f}"
        return line


# ----------------------------------------------------------------------------- plumbing


class _BrokerLink:
    """The DEALER to one broker, with heartbeats, liveness and reconnect back-off (Paranoid Pirate).

    The connection proves the key at the ZeroMQ handshake (PLAIN, see
    ``zdepth.auth``) or uses CurveZMQ. A monitor socket reports how each
    handshake went: a refused key is final (``take_event`` raises
    Unauthorized), and a broker that turns out to take no key at the handshake
    gets a fresh connection without PLAIN (the key then travels in READY only).
    Both sockets are registered with ``poller`` while the link is up.
    """

    EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED

    def __init__(self, ctx: zmq.Context, config: WorkerConfig, endpoint: str, ready: bytes, poller: zmq.Poller) -> None:
        self._ctx, self._config, self._ready, self._poller = ctx, config, ready, poller
        self.endpoint = endpoint
        self.refused = False  # this broker refused the key or certificate: never connected to again
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.generation = 0  # bumped on every connect and close: jobs remember theirs
        self.expires_at = math.inf
        self.next_heartbeat = math.inf
        self.reconnect_at = 0.0
        self.answered = False  # whether the broker spoke on this connection: only then is a flush worth waiting for
        self.plain = config.key is not None  # prove the key at the handshake, until a broker shows it takes none
        self.connected = False  # the current connection's handshake succeeded
        self._failures = 0
        self._connects = 0

    def connect(self, now: float) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        hwm = max(100, 4 * self._config.effective_capacity)
        options = {
            zmq.LINGER: 0,
            zmq.MAXMSGSIZE: self._config.max_message_bytes,
            zmq.RCVHWM: hwm,
            zmq.SNDHWM: hwm,
            zmq.RECONNECT_IVL: int(self._config.reconnect_min_s * 1000),
            zmq.RECONNECT_IVL_MAX: int(self._config.reconnect_max_s * 1000),
            **KEEPALIVE,
        }
        for option, value in options.items():
            sock.setsockopt(option, value)
        auth.apply_peer_security(sock, key=self._config.key, curve=self._config.curve, plain=self.plain)
        self.monitor = sock.get_monitor_socket(self.EVENTS)  # before connect(), so no handshake goes unseen
        sock.connect(self.endpoint)
        self.sock = sock
        self.answered = self.connected = False
        self.generation += 1
        self.expires_at = now + self._config.heartbeat.expiry_s
        self.next_heartbeat = now + self._config.heartbeat.interval_s
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self.monitor, zmq.POLLIN)
        self.send([self._ready])
        self._connects += 1
        log = logger.info if self._connects == 1 else logger.debug  # reconnects were announced with their delay
        log("connecting to broker %s (%s)", self.endpoint, self.mechanism)
        return sock

    @property
    def mechanism(self) -> str:
        if self._config.curve is not None:
            return "CurveZMQ"
        return "the key at the handshake" if self.plain else "no handshake security"

    def close(self, *, linger_ms: int = 0) -> None:
        if self.monitor is not None:
            self._poller.unregister(self.monitor)
            if self.sock is not None:
                self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        if self.sock is not None:
            self._poller.unregister(self.sock)
            self.sock.close(linger=linger_ms)
            self.sock = None
            self.generation += 1
        self.connected = False
        self.expires_at = self.next_heartbeat = math.inf

    def drop(self, now: float) -> float:
        """Close, and schedule the next connect after a back-off; returns the delay."""
        self.close()
        delay = backoff_delay(self._failures, self._config.reconnect_min_s, self._config.reconnect_max_s)
        self._failures += 1
        self.reconnect_at = now + delay
        return delay

    def heard(self, now: float, *, healthy: bool = True) -> None:
        """The broker is alive; ``healthy`` (anything but DISCONNECT) also resets the back-off."""
        self.expires_at = now + self._config.heartbeat.expiry_s
        self.answered = True
        if healthy:
            self._failures = 0

    def take_events(self, now: float) -> None:
        """Act on the monitor's handshake events; raises Unauthorized when the broker refuses us."""
        while self.monitor is not None:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                logger.info("connected to broker %s (%s)", self.endpoint, self.mechanism)
            elif kind == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                logger.info("connection to broker %s lost; libzmq reconnects", self.endpoint)
            elif auth.key_refused(kind, value):
                raise Unauthorized(self._refusal())
            elif auth.mechanism_mismatch(kind, value):
                self._on_mismatch(now)

    def _refusal(self) -> str:
        if self._config.curve is not None:
            return (
                f"broker {self.endpoint} refused this worker's CurveZMQ certificate at the handshake: "
                "put its public key in the broker's allow directory (--curve-allow)"
            )
        return (
            f"broker {self.endpoint} refused this worker's key at the handshake: "
            "give the broker's key with --key-file or ZDEPTH_KEY"
        )

    def _on_mismatch(self, now: float) -> None:
        """The two ends asked for different security: adapt where the key allows it, else give up."""
        if self._config.curve is not None:
            raise Unauthorized(
                f"broker {self.endpoint} does not use CurveZMQ: start it with --curve-secret, "
                "or start this worker without --curve-secret and --curve-server-key"
            )
        if self._config.key is None:
            raise Unauthorized(
                f"broker {self.endpoint} asks for credentials at the handshake that this worker lacks: "
                "give its key with --key-file or ZDEPTH_KEY (or, for a CurveZMQ broker, --curve-secret and --curve-server-key)"
            )
        self.plain = not self.plain
        delay = self.drop(now)
        if self.plain:
            logger.warning("broker %s now asks for the key at the handshake; reconnecting with it in %.2f s", self.endpoint, delay)
        else:
            logger.warning(
                "broker %s takes no key at the handshake (it was started without one); reconnecting without in %.2f s. "
                "The key still travels in READY", self.endpoint, delay,
            )  # fmt: skip

    def send(self, frames: list[Any]) -> bool:
        """Send without ever blocking the loop; a message that cannot be queued is dropped."""
        if self.sock is None:
            return False
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            logger.warning("send queue to broker %s is full; dropped a message", self.endpoint)
            return False

    def heartbeat_if_due(self, now: float) -> None:
        if self.sock is not None and now >= self.next_heartbeat:
            self.send([protocol.command(protocol.HEARTBEAT)])
            self.next_heartbeat = now + self._config.heartbeat.interval_s

    def next_event(self, *, reconnecting: bool) -> float:
        if self.sock is not None:
            return min(self.next_heartbeat, self.expires_at)
        return self.reconnect_at if reconnecting and not self.refused else math.inf


# ----------------------------------------------------------------------------- the worker


class Worker:
    """Serves its brokers until ``stop()``; one instance, one ``run()``.

    Each broker in ``config.brokers`` gets its own connection (a
    ``_BrokerLink``): READY, heartbeats, liveness, reconnects with back-off
    and the handshake's outcome are per broker, and a job's reply goes back
    on the link it came from (unless that link has reconnected since). A
    broker that dies or freezes costs only the requests it had sent; the
    others are served throughout, and the worker rejoins it when it is back.

    Each broker is announced the full ``config.effective_capacity``, not a
    share: a broker that is down or idle would otherwise strand its share of
    the device, and a share of a small capacity rounds to nothing. So with n
    brokers up to n x capacity requests may wait at the worker; the held-bytes
    bound (``max_held_bytes``, past it: overloaded) protects its memory, and
    each request's deadline bounds its wait (past it: timeout, before any
    inference is spent on it).

    ``engine`` is injectable (tests, or a custom engine); by default an
    ``Engine`` is built from ``config``. It needs ``load(model_id)`` and
    ``infer(images, model_id, *, input_size, max_depth) -> list[HxW float32]``;
    a class that also defines ``prepare``, ``run`` and ``collect`` (as
    ``zdepth.engine.Engine`` does) has its batches pipelined step by step.
    """

    def __init__(self, config: WorkerConfig, *, engine: Any = None) -> None:
        # A CPU worker that runs the model itself (no injected engine), or one told its threads, plans its cores.
        cpu = config.device == "cpu" and (engine is None or config.threads is not None)
        self.cpu_plan = cpu_plan(config) if cpu else None
        max_batch = config.max_batch or (self.cpu_plan.max_batch if self.cpu_plan else DEFAULT_MAX_BATCH)
        self.config = config = dataclasses.replace(config, max_batch=max_batch)
        self._engine = engine if engine is not None else _build_engine(config)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{config.device}"
        self._max_pixels = max_pixels(config)
        self._jobs: queue.Queue[Job | _Stop] = queue.Queue()
        self._prepared: queue.Queue[_Item | _Stop] = queue.Queue()  # prepare thread -> compute thread
        self._ran: queue.Queue[_Ran | _Stop] = queue.Queue()  # compute thread -> reply thread
        self._steps = _Steps(self._engine)
        self._results: queue.SimpleQueue[tuple[Job, list[Any] | None]] = queue.SimpleQueue()
        if config.curve is not None:
            _check_curve(config)
        self._wakeup = Wakeup()
        self._ctx = zmq.Context()
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="zdepth-decode")
        self._links: list[_BrokerLink] = []  # one per broker in config.brokers, made once the models are loaded
        self._held_jobs: set[Job] = set()  # the jobs _outstanding counts (I/O loop only)
        self._poller = zmq.Poller()
        self._outstanding = 0  # jobs handed to the compute thread and not yet returned (I/O loop only)
        self._held_bytes = 0  # their held_bytes, bounded by config.max_held_bytes (I/O loop only)
        # Plain flags, not locks: stop() may run inside a signal handler on the I/O loop's own thread.
        self._stop_requested = False
        self._abort = False
        self._draining = False
        self._drain_grace_end = math.inf
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self.serving = False
        self._traffic = Traffic()
        self._metrics: WorkerMetrics | None = None
        self._metrics_server = None
        if config.metrics_port is not None:
            self._metrics = WorkerMetrics(config.models, name=self.name, device=config.device)
            self._metrics.read_held(lambda: (self._outstanding, self._held_bytes))
        self._summary_at = math.inf
        self._summary_from = 0.0

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Load and warm the models, then serve every broker until ``stop()``.

        Raises Unauthorized once every broker has refused the key or
        certificate (one that refuses while others serve is given up alone,
        with an error in the log), and whatever the engine raises while
        loading (WeightsNotFound, UnknownModel, ...).
        """
        # Loading, warm-up and every forward pass happen on the compute thread: CUDA graphs and
        # compiled code stay on one thread (the prepare and reply threads only upload and copy back).
        compute = threading.Thread(target=self._compute_main, name="zdepth-compute", daemon=True)
        graceful = False
        try:
            if self._metrics is not None:  # first: a port in use fails at once, not after minutes of loading
                self._metrics_server = serve_metrics(self.config.metrics_port, self._metrics.registry)
            compute.start()
            self._loaded.wait()
            if self._load_error is not None:
                raise self._load_error
            if self._metrics is not None and self.config.device.startswith("cuda"):
                self._metrics.read_device_memory(cuda_memory(self._engine_attr("device") or self.config.device))
            if self._stop_requested:
                graceful = True
                return
            threads = self.cpu_plan.threads if self.cpu_plan else None
            ready = ready_frame(self.config, name=self.name, device=self._engine_attr("device"), precision=self._engine_attr("precision"), threads=threads)
            self._links = [_BrokerLink(self._ctx, self.config, endpoint, ready, self._poller) for endpoint in self.config.brokers]
            graceful = self._serve()
        finally:
            self._abort = self._abort or not graceful
            self._jobs.put(_Stop())
            if compute.ident is not None:  # started (serving metrics may have failed first)
                compute.join(timeout=None if graceful else 1.0)
            self.serving = False
            for link in self._links:
                flush = graceful and link.answered
                link.close(linger_ms=FLUSH_LINGER_MS if flush else 0)
            self._ctx.term()
            self._wakeup.close()
            self._decoder.shutdown(wait=False, cancel_futures=True)
            if self._metrics_server is not None:
                self._metrics_server.close()

    def stop(self) -> None:
        """Drain: tell the broker to send no more, answer everything held, then return from run().

        A second call stops at once, abandoning what is held. Safe from any
        thread and from a signal handler.
        """
        if self._stop_requested:
            self._abort = True
        self._stop_requested = True
        self._wakeup.set()

    def _load_models(self) -> None:
        """Load every model and run a forward pass per warm-up size before announcing READY.

        With CUDA graphs, one per padded batch size (1, 2, 4, ... up to max_batch's), so that
        no request waits for a capture; with GPU decoding, one from a JPEG; and one through the
        engine's steps, as requests go.
        """
        batches = [1]
        if getattr(self._engine, "cuda_graphs", False):
            batches = padded_batches(self.config.max_batch)
        for model in self.config.models:
            started = time.monotonic()
            try:
                self._engine.load(model)
                for height, width in self.config.warmup_sizes:
                    black = np.zeros((height, width, 3), np.uint8)
                    for count in batches:
                        self._engine.infer([black] * count, model)
                    if getattr(self._engine, "decodes_jpeg", False):  # the GPU decoder's start-up, too
                        self._engine.infer([imageio.device_decodable_jpeg(imageio.encode_jpeg(black))], model)
                    if self._steps.staged:  # and the steps requests take: the upload stream, pinned buffers
                        self._engine.collect(self._engine.run([self._engine.prepare(black, DEFAULT_INPUT_SIZE)], model))
            except ValueError as exc:  # a checkpoint that does not fit, a bad warm-up size
                if isinstance(exc, ZdepthError):
                    raise
                raise ConfigError(f"cannot load model {model!r}: {exc}") from exc
            logger.info("model %s ready on %s in %.1f s", model, self.config.device, time.monotonic() - started)

    # ------------------------------------------------------------------ I/O loop

    @property
    def _link(self) -> _BrokerLink | None:
        """The first broker's link (the only one with a single broker)."""
        return self._links[0] if self._links else None

    def _serve(self) -> bool:
        """The I/O loop over every broker link; True after a completed drain, False after an abort."""
        links = self._links
        self._poller.register(self._wakeup, zmq.POLLIN)
        self.serving = True
        self._summary_from = time.monotonic()
        self._summary_at = self._summary_from + self.config.summary_interval_s
        while True:
            now = time.monotonic()
            if self._abort:
                self._log_summary(now)
                logger.warning("stopping at once; %d requests abandoned", self._outstanding)
                return False
            if self._stop_requested and not self._draining:
                self._begin_drain()
            if self._draining and self._outstanding == 0 and (all(link.sock is None for link in links) or now >= self._drain_grace_end):
                self._log_summary(now)
                logger.info("drained; worker %s stopped", self.name)
                return True
            if now >= self._summary_at:
                self._log_summary(now)
            for link in links:
                self._keep_link(link, now)
            wake_at = min(min(link.next_event(reconnecting=not self._draining) for link in links), self._summary_at)
            if self._draining and self._outstanding == 0:
                wake_at = min(wake_at, self._drain_grace_end)
            timeout_ms = max(0.0, wake_at - now) * 1000
            events = dict(self._poller.poll(None if math.isinf(timeout_ms) else math.ceil(timeout_ms)))
            if self._wakeup in events:
                self._wakeup.clear()
            self._send_results()
            for link in links:
                try:
                    if link.monitor is not None and link.monitor in events:
                        link.take_events(time.monotonic())
                    if link.sock is not None and link.sock in events:
                        self._read_broker(link)
                except Unauthorized as exc:
                    self._refused(link, exc)

    def _refused(self, link: _BrokerLink, exc: Unauthorized) -> None:
        """A broker refused the key or certificate: final for that broker (a setting to fix, not a fault
        that retrying cures). The worker goes on serving the other brokers; when every one has refused
        it, run() raises ``exc``."""
        link.refused = True
        link.close()
        if all(other.refused for other in self._links):
            raise exc
        serving = [other.endpoint for other in self._links if not other.refused]
        logger.error("%s; serving only %s from now on", exc, ", ".join(serving))

    def _log_summary(self, now: float) -> None:
        line = self._traffic.summary(now - self._summary_from)
        if line is not None:
            logger.info("%s", line)
        self._summary_from, self._summary_at = now, now + self.config.summary_interval_s

    def _keep_link(self, link: _BrokerLink, now: float) -> None:
        """Connect when due, give up on a silent broker, send heartbeats."""
        if link.refused:
            return
        if link.sock is None and not self._draining and now >= link.reconnect_at:
            link.connect(now)
        elif link.sock is not None and now >= link.expires_at:
            held = sum(1 for job in self._held_jobs if job.link is link)
            if self._draining:
                link.close()
                logger.warning("broker %s silent while draining; %d replies to it will be lost", link.endpoint, held)
            else:
                answered_before = link.answered
                delay = link.drop(now)
                hint = ""
                if self.config.curve is not None and not answered_before:
                    hint = " (it never answered: with CurveZMQ, check that this worker's public key is in the broker's allow directory)"
                lost = f"; {held} requests from it abandoned (the broker re-queues them)" if held else ""
                logger.warning(
                    "broker %s silent for %.1f s; reconnecting in %.2f s%s%s", link.endpoint, self.config.heartbeat.expiry_s, delay, lost, hint
                )  # fmt: skip
        link.heartbeat_if_due(now)

    def _read_broker(self, link: _BrokerLink) -> None:
        for _ in range(MAX_READS_PER_WAKE):
            if link.sock is None:
                return
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(link, frames)

    def _on_message(self, link: _BrokerLink, frames: list[zmq.Frame]) -> None:
        now = time.monotonic()
        try:
            header = protocol.parse_command(frames[0].buffer)
        except BadRequest as exc:
            link.heard(now)
            logger.warning("ignored a malformed message from broker %s: %s", link.endpoint, exc)
            return
        cmd = header["cmd"]
        if not link.answered and cmd != protocol.DISCONNECT:
            logger.info(
                "registered with broker %s: serving %s, capacity %d",
                link.endpoint, ", ".join(self.config.models), self.config.effective_capacity,
            )  # fmt: skip
        link.heard(now, healthy=cmd != protocol.DISCONNECT)
        if cmd == protocol.REQUEST:
            self._on_request(link, header, frames[1:], now)
        elif cmd == protocol.DISCONNECT:
            self._on_disconnect(link, header.get("reason"), now)
        elif cmd != protocol.HEARTBEAT:
            logger.warning("ignored unknown command %r from broker %s", cmd, link.endpoint)

    def _on_request(self, link: _BrokerLink, header: dict[str, Any], body: list[zmq.Frame], now: float) -> None:
        """Queue the job for the compute thread, or fail it here if it is malformed."""
        rid = header.get("rid")
        if rid is None:
            logger.warning("ignored a REQUEST without 'rid' (request id %r)", header.get("id"))
            return
        request_id = header.get("id") if isinstance(header.get("id"), str) else None
        try:
            job = parse_request(
                header, body, models=self.config.models, now=now, generation=link.generation, max_image_bytes=self.config.max_message_bytes
            )
        except ServiceError as exc:
            self._refuse(link, rid, request_id, exc.code, exc.message, now)
            return
        except Exception as exc:  # a bug in a parser fails this request, never the worker
            logger.exception("parsing request %r failed", request_id)
            self._refuse(link, rid, request_id, "internal", f"the worker could not parse the request: {type(exc).__name__}", now)
            return
        job.link = link
        try:
            # Everything the header can tell is checked before decoding starts: a request that would be
            # refused anyway never costs a decode, and the decode's peak bytes are counted up front.
            info = imageio.inspect_image(job.image, max_pixels=self._max_pixels)
            check_reply_size(job, info.height, info.width, self.config.max_message_bytes)
            check_network_size(job, info.height, info.width)
        except ServiceError as exc:
            self._refuse(link, rid, request_id, exc.code, exc.message, now)
            return
        job.held_bytes = held_bytes(job.image, info)
        if self._outstanding and self._held_bytes + job.held_bytes > self.config.max_held_bytes:
            message = (
                f"this worker holds {self._held_bytes} bytes of images and this one needs {job.held_bytes} "
                f"(limit {self.config.max_held_bytes}); retry in a moment, send smaller images, or add workers"
            )
            self._refuse(link, rid, request_id, "overloaded", message, now)
            return
        job.decoded = self._decode(job.image)
        self._outstanding += 1
        self._held_bytes += job.held_bytes
        self._held_jobs.add(job)
        self._jobs.put(job)

    def _refuse(self, link: _BrokerLink, rid: Any, request_id: str | None, code: str, message: str, received: float) -> None:
        """Answer a request from the I/O loop, before it reached the compute side."""
        link.send(error_frames(rid, request_id, code, message))
        seconds = time.monotonic() - received
        self._traffic.reply(code, seconds * 1000)
        if self._metrics is not None:
            self._metrics.request_done(None, None, code, seconds)
        logger.debug("request %r (rid %r): %s: %s", request_id, rid, code, message)

    def _decode(self, image: Any) -> Future[Any]:
        """The image's pixels from the decode pool, or, for a JPEG the engine decodes on the GPU, the JPEG itself."""
        if getattr(self._engine, "decodes_jpeg", False) and not isinstance(image, np.ndarray):
            done: Future[Any] = Future()
            try:
                jpeg = imageio.device_decodable_jpeg(image, max_pixels=self._max_pixels)
            except BadRequest as exc:
                done.set_exception(exc)
                return done
            if jpeg is not None:
                done.set_result(jpeg)
                self._count_decode("device")
                return done
        self._count_decode("raw" if isinstance(image, np.ndarray) else "cpu")
        return self._decoder.submit(imageio.decode_image, image, max_pixels=self._max_pixels)

    def _count_decode(self, where: str) -> None:
        if self._metrics is not None:
            self._metrics.decoded(where)

    def _on_disconnect(self, link: _BrokerLink, reason: Any, now: float) -> None:
        if reason == protocol.REASON_UNAUTHORIZED:
            raise Unauthorized(
                f"broker {link.endpoint} refused this worker: wrong or missing key. "
                "Give the broker's key with --key-file or ZDEPTH_KEY (the key the broker was started with)"
            )
        if self._draining:
            logger.debug("broker %s sent DISCONNECT %r while draining; ignored", link.endpoint, reason)
            return
        delay = link.drop(now)
        logger.warning("broker %s sent DISCONNECT %r; announcing again in %.2f s", link.endpoint, reason, delay)

    def _begin_drain(self) -> None:
        """Tell every broker to send no more; the loop returns once all that is held is answered."""
        self._draining = True
        self._drain_grace_end = time.monotonic() + DRAIN_GRACE_S
        told = [link.endpoint for link in self._links if link.send([protocol.command(protocol.DISCONNECT, reason="draining")])]
        logger.info("draining: finishing %d requests; told %s to send no more", self._outstanding, ", ".join(told) or "no broker (none connected)")

    def _send_results(self) -> None:
        """Send what the compute thread finished, each to the broker it came from; results for a
        connection dropped since the request came are abandoned."""
        while True:
            try:
                job, frames = self._results.get_nowait()
            except queue.Empty:
                return
            self._outstanding -= 1
            self._held_bytes -= job.held_bytes
            self._held_jobs.discard(job)
            link = job.link
            if frames is not None and job.generation == link.generation:
                link.send(frames)
                seconds = time.monotonic() - job.received
                latency_ms = seconds * 1000
                self._traffic.reply(job.status, latency_ms)
                if self._metrics is not None:
                    self._metrics.request_done(job.op, job.model, job.status, seconds)
                logger.debug("request %r (rid %r): %s in %.1f ms", job.request_id, job.rid, job.status, latency_ms)

    def _engine_attr(self, name: str) -> str | None:
        value = getattr(self._engine, name, None)
        if value is None:
            value = getattr(self.config, name, None)
        return None if value is None else str(value)

    # ------------------------------------------------------------------ the pipeline

    def _compute_main(self) -> None:
        try:
            self._apply_cpu_plan()
            self._load_models()
        except BaseException as exc:  # noqa: BLE001 - handed to run(), which raises it on the I/O thread
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        if not self.config.pipeline:
            self._sequential_loop()
            return
        helpers = [
            threading.Thread(target=self._prepare_loop, name="zdepth-prepare", daemon=True),
            threading.Thread(target=self._reply_loop, name="zdepth-reply", daemon=True),
        ]
        for thread in helpers:
            thread.start()
        try:
            self._compute_loop()  # returns after the stop has passed through the prepare thread
        finally:
            for thread in helpers:
                thread.join(timeout=None if not self._abort else 1.0)

    def _apply_cpu_plan(self) -> None:
        """Give the forward pass its threads (set here, on the thread that runs it) and keep OpenCV's
        own thread pool from competing with them: decoding and preparing run on the worker's threads."""
        plan = self.cpu_plan
        if plan is None:
            return
        import cv2
        import torch

        torch.set_num_threads(plan.threads)
        cv2.setNumThreads(1)
        logger.info(
            "CPU: %d torch threads for the forward pass (%s), batches of up to %d, %s",
            plan.threads, plan.why, self.config.max_batch, "pipelined" if self.config.pipeline else "not pipelined",
        )  # fmt: skip

    def _prepare_loop(self) -> None:
        """Pipeline stage one: each job's decoded image, prepared for the device, in arrival order."""
        while True:
            job = self._jobs.get()
            if isinstance(job, _Stop):
                self._prepared.put(job)
                return
            try:
                item = self._prepare(job)
            except Exception:  # a bug here must not kill the thread or leave a request unanswered
                logger.exception("internal error preparing request %r", job.request_id)
                self._fail(job, "internal", "internal error in the worker; see its log")
                item = None
            if item is not None:
                self._prepared.put(item)

    def _compute_loop(self) -> None:
        """Pipeline stage two: batches of prepared images through the device, one after another."""
        pending: list[_Item | _Stop] = []
        max_wait_s = self.config.max_wait_ms / 1000
        while True:
            batch = collect_batch(self._prepared, max_batch=self.config.max_batch, max_wait_s=max_wait_s, key=_batch_key, pending=pending)
            if isinstance(batch[0], _Stop):
                self._ran.put(batch[0])
                return
            try:
                ran = self._run([item for item in batch if self._admit(item.job)])
            except Exception:
                logger.exception("internal error in a batch of %d", len(batch))
                self._fail_unanswered([item.job for item in batch])
                continue
            if ran is not None:
                self._ran.put(ran)

    def _reply_loop(self) -> None:
        """Pipeline stage three: wait for each batch's depth maps, build and hand over the replies."""
        while True:
            ran = self._ran.get()
            if isinstance(ran, _Stop):
                return
            try:
                self._reply(ran)
            except Exception:
                logger.exception("internal error replying to a batch of %d", len(ran.items))
            self._fail_unanswered([item.job for item in ran.items])

    def _sequential_loop(self) -> None:
        """The same steps on one thread, each batch's in turn (``WorkerConfig.pipeline`` off)."""
        pending: list[Job | _Stop] = []
        max_wait_s = self.config.max_wait_ms / 1000
        while True:
            batch = collect_batch(self._jobs, max_batch=self.config.max_batch, max_wait_s=max_wait_s, key=_batch_key, pending=pending)
            if isinstance(batch[0], _Stop):
                return
            try:
                items = [item for item in map(self._prepare, batch) if item is not None]
                ran = self._run(items)
                if ran is not None:
                    self._reply(ran)
            except Exception:  # a bug here must not kill the thread or leave a request unanswered
                logger.exception("internal error in a batch of %d", len(batch))
            self._fail_unanswered(batch)

    def _admit(self, job: Job) -> bool:
        """Whether the job goes on; an abandoned (old connection, abort) or late one is settled here."""
        if self._abort or job.generation != job.link.generation:
            job.decoded.cancel()
            self._emit(job, None)
            return False
        now = time.monotonic()
        if job.deadline is not None and now >= job.deadline:
            job.decoded.cancel()
            late_ms = (now - job.deadline) * 1000
            self._fail(job, "timeout", f"the deadline passed {late_ms:.0f} ms before inference could start; the worker is busy")
            return False
        return True

    def _prepare(self, job: Job) -> _Item | None:
        """The job's image, decoded and prepared for the engine; None when the job was answered instead."""
        if not self._admit(job):
            return None
        try:
            image = job.decoded.result()
            return _Item(job, self._steps.prepare(image, job.batch_key[1]))
        except ServiceError as exc:
            self._fail(job, exc.code, exc.message)
        except Exception as exc:
            logger.exception("decoding or preparing the image of request %r failed", job.request_id)
            self._fail(job, "internal", f"decoding the image failed: {type(exc).__name__}: {exc}")
        return None

    def _run(self, items: list[_Item]) -> _Ran | None:
        """Start one forward pass over ``items``; when it fails, each is run alone, so one bad input fails alone."""
        if not items:
            return None
        started = time.monotonic()
        parts = self._run_parts(items)
        self._traffic.batch(len(items))
        model, input_size = items[0].job.batch_key
        logger.debug("batch of %d for %s at %d started", len(items), model, input_size)
        return _Ran(items, parts, started)

    def _run_parts(self, items: list[_Item]) -> list[tuple[list[_Item], Any]]:
        try:
            return [(items, self._steps.run([item.prepared for item in items], [item.job for item in items]))]
        except Exception as exc:
            if len(items) > 1:
                logger.warning("batch of %d failed (%s: %s); retrying one by one", len(items), type(exc).__name__, exc)
                return [part for item in items for part in self._run_parts([item])]
            if isinstance(exc, ServiceError):
                return [(items, exc)]
            logger.exception("inference failed for request %r", items[0].job.request_id)
            return [(items, InternalError(f"inference failed: {type(exc).__name__}: {exc}"))]

    def _reply(self, ran: _Ran) -> None:
        """Wait for a batch's depth maps and hand each job its reply."""
        depths: list[tuple[_Item, Any]] = []
        for items, outcome in ran.parts:
            if not isinstance(outcome, ServiceError):
                try:
                    outcome = self._steps.collect(outcome)
                except Exception as exc:
                    logger.exception("inference failed for a batch of %d", len(items))
                    outcome = InternalError(f"inference failed: {type(exc).__name__}: {exc}")
            depths += zip(items, outcome) if not isinstance(outcome, ServiceError) else [(item, outcome) for item in items]
        infer_ms = (time.monotonic() - ran.started) * 1000
        model, input_size = ran.items[0].job.batch_key
        if self._metrics is not None:
            self._metrics.inference(infer_ms / 1000, len(ran.items), model)
        logger.debug("batch of %d for %s at %d: %.1f ms", len(ran.items), model, input_size, infer_ms)
        for item, result in depths:
            job = item.job
            if isinstance(result, ServiceError):
                self._fail(job, result.code, result.message)
                continue
            depth, depth_range = result
            timings = {"queue_ms": (ran.started - job.received) * 1000, "infer_ms": infer_ms}
            try:
                timings["worker_ms"] = (time.monotonic() - job.received) * 1000
                frames = reply_frames(job, depth, worker=self.name, timings=timings, batch=len(ran.items), depth_range=depth_range)
                self._emit(job, frames, protocol.STATUS_OK)
            except ServiceError as exc:
                self._fail(job, exc.code, exc.message)
            except Exception as exc:
                logger.exception("building the reply to request %r failed", job.request_id)
                self._fail(job, "internal", f"building the reply failed: {type(exc).__name__}: {exc}")

    def _fail_unanswered(self, jobs: list[Job]) -> None:
        for job in jobs:
            if not job.done:
                self._fail(job, "internal", "internal error in the worker; see its log")

    def _fail(self, job: Job, code: str, message: str) -> None:
        self._emit(job, error_frames(job.rid, job.request_id, code, message), code)

    def _emit(self, job: Job, frames: list[Any] | None, status: str | None = None) -> None:
        """Hand one job's reply (None: abandoned) and its status to the I/O loop; each job gets exactly one."""
        if job.done:
            return
        job.done = True
        job.status = status
        self._results.put((job, frames))
        self._wakeup.set()


@dataclass(eq=False)
class _Item:
    """A job whose image the engine has prepared."""

    job: Job
    prepared: Any

    @property
    def batch_key(self) -> Hashable:
        return self.job.batch_key


@dataclass(eq=False)
class _Ran:
    """A batch whose forward pass was started: each part (the whole batch, or after a failure each
    item alone) with what the engine returned for it, or the error that fails it."""

    items: list[_Item]
    parts: list[tuple[list[_Item], Any]]
    started: float  # time.monotonic()


class _Steps:
    """How a batch goes through the engine: prepare each image, run the batch, collect the depth maps.

    An engine whose class defines ``prepare``, ``run`` and ``collect``
    (zdepth.engine.Engine) has them called on the pipeline's three threads.
    Any other engine (``infer`` only: a custom engine, a test double) runs
    whole in ``run``, on the compute thread.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.staged = all(callable(getattr(type(engine), name, None)) for name in ("prepare", "run", "collect"))

    def prepare(self, image: Any, input_size: int) -> Any:
        return self.engine.prepare(image, input_size) if self.staged else image

    def run(self, prepared: list[Any], jobs: list[Job]) -> Any:
        model, input_size = jobs[0].batch_key
        max_depth = [job.params.max_depth for job in jobs] if is_metric_model(model) else None
        if self.staged:
            # float16 replies are cast on the device (half the bytes to copy back); a point cloud needs float32 depth.
            float16 = [job.params.depth_dtype == "float16" and job.op != protocol.OP_POINTCLOUD for job in jobs]
            return self.engine.run(prepared, model, max_depth=max_depth, float16=float16)
        return list(self.engine.infer(prepared, model, input_size=input_size, max_depth=max_depth))

    def collect(self, ran: Any) -> list[tuple[np.ndarray, tuple[float, float] | None]]:
        """Each depth map with its (min, max) when the engine took them on the device, else None."""
        if not self.staged:
            return [(depth, None) for depth in ran]
        return list(zip(self.engine.collect(ran), ran.ranges()))


def _batch_key(item: Job | _Item | _Stop) -> Hashable:
    return item.batch_key


def _build_engine(config: WorkerConfig) -> Any:
    from zdepth.engine.inference import Engine  # torch is imported only when a worker really starts

    try:
        return Engine(
            device=config.device,
            precision=config.precision,
            weights_dir=config.weights_dir,
            download=config.download,
            compile=config.compile,
            cuda_graphs=config.device.startswith("cuda") if config.cuda_graphs is None else config.cuda_graphs,
            gpu_decode=config.gpu_decode,
        )
    except ValueError as exc:  # bad device or precision, CUDA graphs off CUDA
        raise ConfigError(str(exc)) from exc


def _check_curve(config: WorkerConfig) -> None:
    """Read the CurveZMQ certificates now, so a bad path fails before minutes of model loading."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as probe:
        probe.linger = 0
        apply_client(probe, config.curve)


# ----------------------------------------------------------------------------- entry point


def exit_status(exc: BaseException) -> int:
    """The exit status for what stopped a worker: permanent causes (restarting cannot help) get their
    own status (``zdepth.supervisor.PERMANENT_EXITS``), so ``zdepth serve`` and service managers stop
    retrying; anything else is 1, worth another try."""
    if isinstance(exc, (ConfigError, Unauthorized)):  # a bad setting, or a key or certificate the broker refuses
        return EXIT_CONFIG
    if isinstance(exc, WeightsNotFound) or (isinstance(exc, ModuleNotFoundError) and exc.name == "torch"):
        return EXIT_MISSING
    if isinstance(exc, MetricsBindError):
        return EXIT_ADDRESS
    return EXIT_FAILURE


def run_worker(config: WorkerConfig) -> int:
    """Run a worker in this process until SIGTERM or SIGINT; the CLI's ``zdepth worker``.

    The first signal drains (finish held requests, then exit); a second one
    stops at once. Returns the exit status (``exit_status``), after logging
    why: 0 after a stop; 2 for bad settings (ConfigError: device,
    certificates, a checkpoint that does not fit) and for a key or
    certificate a broker refuses; 3 for missing weights; 4 for a metrics port
    in use; 1 for other failures; 130 if interrupted while loading.
    """
    try:
        worker = Worker(config)
    except (ZdepthError, MetricsBindError, ModuleNotFoundError) as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name != "torch":
            raise
        logger.error("%s", exc)
        return exit_status(exc)

    def stop_now() -> None:
        if not worker.serving:
            raise KeyboardInterrupt  # still loading models: nothing to drain
        worker.stop()

    restore = on_stop_signals(worker.stop, stop_now, doing="draining")
    try:
        worker.run()
    except (ZdepthError, MetricsBindError) as exc:
        logger.error("%s", exc)
        return exit_status(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        restore()
    return EXIT_OK
