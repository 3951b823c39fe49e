"""``zdepth bench``: N concurrent clients for S seconds against a server.

Each client is a thread with its own ``Client`` (sockets are per thread) that
keeps ``in_flight`` requests out through ``Client.stream`` and records every
reply's round trip. Each client sends one untimed request first, so model
warm-up and connection set-up stay out of the numbers. numpy and the client
only; no torch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from zdepth.models import is_metric_model, split_model_id
from zdepth.protocol import OP_METRIC, OP_RELATIVE
from zdepth.protocol.images import read_image

__all__ = ["make_frames", "percentile_summary", "run_bench", "synthetic_frame"]

logger = logging.getLogger(__name__)

MAX_ERROR_SAMPLES = 3


def synthetic_frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 BGR frame with some structure (gradients and noise), so JPEG and the model see an image."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    base = np.stack([y * np.ones_like(x), x * np.ones_like(y), (x + y) / 2], axis=-1)
    noisy = base * 200 + rng.normal(0, 20, (height, width, 3)).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def make_frames(images: Sequence[str | os.PathLike[str]] | None, size: tuple[int, int]) -> list[np.ndarray]:
    """The frames to send: the given images decoded, or one synthetic frame of ``size`` (height, width)."""
    if images:
        return [read_image(path) for path in images]
    return [synthetic_frame(*size)]


def percentile_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    if not latencies_ms:
        return {k: float("nan") for k in ("p50", "p90", "p99", "mean", "min", "max")}
    values = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.samples: list[str] = []

    def error(self, exc: BaseException) -> None:
        code = getattr(exc, "code", None)
        code = code if isinstance(code, str) else type(exc).__name__
        with self.lock:
            self.errors[code] += 1
            if len(self.samples) < MAX_ERROR_SAMPLES:
                self.samples.append(f"[{code}] {exc}")


def run_bench(
    address: str,
    frames: Sequence[np.ndarray],
    *,
    key: str | None = None,
    clients: int = 4,
    seconds: float = 10.0,
    model: str | None = None,
    input_size: int | None = None,
    in_flight: int = 1,
    wire_format: str = "raw",
    depth_codec: str = "none",
    timeout: float = 30.0,
    curve: Any = None,
) -> dict[str, Any]:
    """Run the load and return a report: frames, fps, latency percentiles (ms), errors by code.

    ``curve``: a ``zdepth.protocol.curve.CurveClient`` for a broker that runs CurveZMQ.
    ``depth_codec``: as ``Client``'s, so a slow link's gain (and the worker's compression cost) can be measured.
    """
    from zdepth.client.sync import Client

    metric = model is not None and is_metric_model(model)
    op = OP_METRIC if metric else OP_RELATIVE
    encoder, dataset = split_model_id(model)
    client_kwargs: dict[str, Any] = {
        "encoder": encoder, "input_size": input_size, "wire_format": wire_format, "depth_codec": depth_codec, "curve": curve,
    }  # fmt: skip
    if dataset:
        client_kwargs["dataset"] = dataset
    tally = _Tally()
    start_at: list[float] = []
    # The last client to finish its warm-up starts the clock, before any of them is released.
    barrier = threading.Barrier(clients, action=lambda: start_at.append(time.monotonic()))

    def frame_source(end: float, offset: int) -> Iterator[np.ndarray]:
        i = offset
        while time.monotonic() < end:
            yield frames[i % len(frames)]
            i += 1

    def one_client(number: int) -> None:
        try:
            with Client(address, key=key, timeout=timeout, retries=0, **client_kwargs) as client:
                warmup = next(client.stream([frames[number % len(frames)]], op=op, return_exceptions=True))
                if isinstance(warmup, BaseException):
                    logger.warning("bench client %d: warm-up request failed: %s", number, warmup)
                barrier.wait(timeout=timeout + 10)
                end = start_at[0] + seconds
                for result in client.stream(frame_source(end, number), op=op, max_in_flight=in_flight, return_exceptions=True):
                    if isinstance(result, BaseException):
                        tally.error(result)
                    else:
                        with tally.lock:
                            tally.latencies.append(result.timings["round_trip_ms"])
        except threading.BrokenBarrierError:
            return
        except Exception as exc:  # noqa: BLE001 - a client-side failure ends this client, and is reported
            tally.error(exc)
            barrier.abort()
            logger.warning("bench client %d stopped: %s", number, exc)

    threads = [threading.Thread(target=one_client, args=(n,), name=f"bench-{n}", daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * timeout + seconds + 20)
    started = start_at[0] if start_at else time.monotonic()
    elapsed = time.monotonic() - started
    count = len(tally.latencies)
    height, width = frames[0].shape[:2]
    return {
        "clients": clients,
        "in_flight": in_flight,
        "depth_codec": depth_codec,
        "seconds": elapsed,
        "size": f"{height}x{width}",
        "model": model,
        "frames": count,
        "fps": count / elapsed if elapsed > 0 else 0.0,
        "latency_ms": percentile_summary(tally.latencies),
        "errors": sum(tally.errors.values()),
        "errors_by_code": dict(tally.errors),
        "error_samples": tally.samples,
    }
