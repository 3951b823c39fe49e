"""The frames the worker sends its broker: READY, and the REPLY to each task (depth maps or an error)."""

from __future__ import annotations

import math
import os
import socket
from typing import Any

import numpy as np

from zdepth import __version__, protocol
from zdepth.config import WorkerConfig
from zdepth.pointcloud import Intrinsics, depth_to_points
from zdepth.protocol import codec, compression
from zdepth.worker.task import Task

__all__ = ["error_frames", "ready_frame", "reply_frames"]


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
    task: Task, depth: np.ndarray, *, worker: str, timings: dict[str, float], batch: int, depth_range: tuple[float, float] | None = None
) -> list[Any]:
    """A REPLY with the depth map (and points for a point cloud) as raw array frames.

    ``depth``: HxW from the engine, float32 (or float16 already cast on the
    device); sent as float32 or float16 as the request asked. ``min``/``max``
    are taken before any cast: ``depth_range`` when the engine took them,
    else here. With ``depth_codec="zstd"`` the depth frame goes compressed
    (byte planes + zstd), here on the reply-building thread, off the compute
    thread; ``points`` always go as they are (float32 XYZ gains little).
    """
    if depth.dtype != np.float16:
        depth = np.asarray(depth, dtype=np.float32)
    arrays = {"depth": depth.astype(codec.DEPTH_DTYPES[task.params.depth_dtype], copy=False)}
    if task.op == protocol.OP_POINTCLOUD:
        arrays["points"], _ = depth_to_points(depth.astype(np.float32, copy=False), Intrinsics(*task.params.intrinsics))
    compressed = ("depth",) if task.params.depth_codec == compression.ZSTD else ()
    descs, buffers = codec.array_frames(arrays, compressed=compressed)
    if depth_range is None and depth.dtype == np.float16:
        raise ValueError("a float16 depth map needs the min and max of its float32 values")
    low, high = depth_range if depth_range is not None else _nan_min_max(depth)
    header = protocol.reply_header(
        task.request_id,
        model=task.model,
        worker=worker,
        min=low,
        max=high,
        timings=timings,
        batch=batch,
        arrays=descs,
    )
    return [protocol.command(protocol.REPLY, rid=task.rid, status=protocol.STATUS_OK), header, *buffers]


def _nan_min_max(depth: np.ndarray) -> tuple[float, float]:
    """Min and max ignoring NaN (NaN only if all of it is), without numpy's all-NaN warning."""
    low, high = float(depth.min()), float(depth.max())
    if math.isnan(low) or math.isnan(high):
        finite = depth[~np.isnan(depth)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)
    return low, high
