"""Settings of the broker and the worker as frozen dataclasses, validated up front.

Defaults are what a lab LAN wants; the CLI maps its options (and ``ZDEPTH_*``
environment variables) onto these fields.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from zdepth.errors import ConfigError
from zdepth.protocol.curve import CurveClient, CurveServer

DEFAULT_CLIENT_PORT = 5555
DEFAULT_WORKER_PORT = 5556
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_HELD_BYTES = 1024 * 1024 * 1024
DEFAULT_MAX_BATCH = 8  # a worker's largest batch on CUDA, unless set
MAX_QUEUE_BYTES = 1024 * 1024 * 1024
MAX_CLIENT_BYTES = 256 * 1024 * 1024
CLIENT_REPLY_HWM = 64


def read_key(key: str | None = None, key_file: str | os.PathLike | None = None) -> str | None:
    """The shared secret: given directly, else from a key file, else ``ZDEPTH_KEY``, else ``ZDEPTH_KEY_FILE``.

    Keys never need to appear on a command line, where ``ps`` would show them.
    """
    if key:
        return key
    if not key_file and os.environ.get("ZDEPTH_KEY"):
        return os.environ["ZDEPTH_KEY"]
    key_file = key_file or os.environ.get("ZDEPTH_KEY_FILE")
    if not key_file:
        return None
    try:
        text = Path(key_file).expanduser().read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {key_file}: {exc.strerror}") from exc
    if not text:
        raise ConfigError(f"key file {key_file} is empty")
    return text


@dataclass(frozen=True)
class Heartbeat:
    """Both sides send one every ``interval_s``; a peer silent for ``liveness`` intervals is dead."""

    interval_s: float = 1.0
    liveness: int = 3

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.liveness < 1:
            raise ConfigError(f"heartbeat interval must be > 0 and liveness >= 1, got {self.interval_s}, {self.liveness}")

    @property
    def expiry_s(self) -> float:
        return self.interval_s * self.liveness

    @property
    def recent_s(self) -> float:
        """Heard from within this long: the peer may be given new work (a late heartbeat holds work back, not the peer)."""
        return min(2 * self.interval_s, self.expiry_s)


@dataclass(frozen=True)
class BrokerConfig:
    clients: str = f"tcp://*:{DEFAULT_CLIENT_PORT}"
    workers: str = f"tcp://*:{DEFAULT_WORKER_PORT}"
    key: str | None = None
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    max_queue: int = 1024  # requests held (waiting, or at a worker), all models together; past it: overloaded
    max_queue_bytes: int = MAX_QUEUE_BYTES  # their body bytes, all models together; past it: overloaded
    max_client_bytes: int = MAX_CLIENT_BYTES  # body bytes held for one connection, queued and in flight
    # Replies queued for one connection that is not reading; past it that connection's newest replies are dropped.
    # With replies at most max_message_bytes, this and max_client_bytes bound what one client can make the broker hold.
    client_reply_hwm: int = CLIENT_REPLY_HWM
    default_timeout_s: float = 30.0  # deadline for requests that name none
    max_message_bytes: int = MAX_MESSAGE_BYTES
    drain_timeout_s: float = 5.0  # on shutdown, how long replies already in flight are awaited
    # After the broker starts, or a model's last worker leaves, requests for it wait this long for a
    # worker to (re)register before failing with unknown_model; covers a worker's reconnect back-off.
    reconnect_grace_s: float = 10.0
    curve: CurveServer | None = None  # encryption and an allow-list of peers; see zdepth.protocol.curve
    metrics_port: int | None = None  # serve Prometheus metrics at http://*:PORT/metrics; None: off. See zdepth.metrics

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_queue_bytes < 1:
            raise ConfigError(f"max_queue_bytes must be >= 1, got {self.max_queue_bytes}")
        if self.default_timeout_s <= 0:
            raise ConfigError(f"default_timeout_s must be > 0, got {self.default_timeout_s}")
        if self.max_client_bytes < 1 or self.client_reply_hwm < 1:
            raise ConfigError(f"max_client_bytes and client_reply_hwm must be >= 1, got {self.max_client_bytes}, {self.client_reply_hwm}")


@dataclass(frozen=True)
class WorkerConfig:
    broker: str = f"tcp://localhost:{DEFAULT_WORKER_PORT}"  # one worker endpoint, or several comma-separated (see brokers)
    models: tuple[str, ...] = ("vits",)
    key: str | None = None
    device: str = "cpu"
    precision: str | None = None  # None: fp16 on CUDA, fp32 on CPU
    weights_dir: str | None = None
    download: bool = False
    compile: bool = False
    cuda_graphs: bool | None = None  # replay forward passes as CUDA graphs; None: on CUDA devices. See zdepth.engine.cudagraphs
    gpu_decode: bool = False  # decode JPEGs with nvjpeg (CUDA only): faster, ~1e-2 from cv2's pixels; see Engine
    max_batch: int | None = None  # largest batch per forward pass; None: 8 on CUDA, chosen for a CPU (zdepth.worker.cpu_plan)
    max_wait_ms: float = 0.0  # extra wait for a partial batch; at 0 batches form from what queued during the last one
    capacity: int | None = None  # requests the broker may give at once; default 2 x max_batch
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    reconnect_min_s: float = 0.25
    reconnect_max_s: float = 8.0
    warmup_sizes: tuple[tuple[int, int], ...] = ((480, 640),)
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Image bytes held at once (frames as received plus the peak bytes of decoding them); past it: overloaded.
    max_held_bytes: int = MAX_HELD_BYTES
    # Pixels per image. None: the most whose float32 depth map fits one reply message (max_message_bytes / 4,
    # 4096 x 4096 at 64 MiB), so that every image a worker accepts can be answered. See zdepth.worker.max_pixels.
    max_pixels: int | None = None
    curve: CurveClient | None = None
    # Overlap host and device work: batch N+1 is decoded and prepared, and N-1's replies built, while N runs.
    # False: one compute thread does each batch's steps in turn (for comparison; see benchmarks/overlap.py).
    pipeline: bool = True
    metrics_port: int | None = None  # serve Prometheus metrics at http://*:PORT/metrics; None: off. See zdepth.metrics
    threads: int | None = None  # torch intra-op threads on the CPU; None: chosen from the cores (zdepth.worker.cpu_plan)
    summary_interval_s: float = 10.0  # one INFO line on what was served per interval with traffic; each request logs at DEBUG

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("a worker needs at least one model, for example --model vits")
        if not self.brokers or len(set(self.brokers)) != len(self.brokers):
            raise ConfigError(f"a worker needs one or more distinct broker endpoints, got {self.broker!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.capacity is not None and self.capacity < 1:
            raise ConfigError(f"capacity must be >= 1, got {self.capacity}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("reconnect back-off needs 0 < reconnect_min_s <= reconnect_max_s")
        if self.max_held_bytes < 1:
            raise ConfigError(f"max_held_bytes must be >= 1, got {self.max_held_bytes}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.summary_interval_s <= 0:
            raise ConfigError(f"summary_interval_s must be > 0, got {self.summary_interval_s}")

    @property
    def brokers(self) -> tuple[str, ...]:
        """Every broker this worker serves: one connection and one READY each, one device shared by all."""
        return tuple(b.strip() for b in self.broker.split(",") if b.strip())

    @property
    def effective_capacity(self) -> int:
        return self.capacity or 2 * (self.max_batch or DEFAULT_MAX_BATCH)
