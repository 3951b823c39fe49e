"""Replies into results: a call's ``finish`` decodes its reply's header and arrays into what the caller gets.

Sans-IO: the pipeline hands over the decoded header and arrays; nothing here
knows of sockets. numpy only (never torch).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from zdepth.client.calls import image_pixels
from zdepth.client.results import DepthResult, PointCloudResult
from zdepth.errors import InternalError, ServiceError
from zdepth.pointcloud import Intrinsics, depth_to_points

MAX_REPLY_HEADER_BYTES = 1024 * 1024  # a health map of a big cluster outgrows the 4 KiB request limit


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def depth_from_reply(header: dict[str, Any], arrays: dict[str, np.ndarray], round_trip_ms: float, index: int | None) -> DepthResult:
    """The DepthResult of a reply: the ``depth`` array as writable float32, min/max, model, worker, timings."""
    wire = arrays.get("depth")
    if wire is None or wire.ndim != 2:
        raise InternalError(f"the reply has no HxW 'depth' array (arrays: {sorted(arrays)})")
    depth = np.array(wire, dtype=np.float32)  # owned and writable, float32 even from float16 on the wire
    return _depth_result(depth, header, round_trip_ms, index)


def _depth_result(depth: np.ndarray, header: dict[str, Any], round_trip_ms: float, index: int | None) -> DepthResult:
    low, high = _number(header.get("min")), _number(header.get("max"))
    if low is None or high is None:
        finite = depth[np.isfinite(depth)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)
    raw_timings = header.get("timings")
    timings = {}
    if isinstance(raw_timings, dict):
        timings = {str(k): float(v) for k, v in raw_timings.items() if _number(v) is not None}
    timings["round_trip_ms"] = round_trip_ms
    return DepthResult(
        depth=depth,
        min=low,
        max=high,
        model=str(header.get("model") or ""),
        worker=str(header.get("worker") or ""),
        timings=timings,
        index=index,
    )


def finish_depth(header: dict[str, Any], arrays: dict[str, np.ndarray], round_trip_ms: float, index: int | None) -> DepthResult:
    return depth_from_reply(header, arrays, round_trip_ms, index)


def finish_health(header: dict[str, Any], arrays: dict[str, np.ndarray], round_trip_ms: float, index: int | None) -> dict:
    health = header.get("health")
    if not isinstance(health, dict):
        raise InternalError("the health reply has no 'health' map; is the address a zdepth broker?")
    return health


@dataclass(frozen=True)
class PointCloudFinisher:
    """Builds a PointCloudResult from a depth reply (client side) or a points reply (server side)."""

    image: Any
    intrinsics: Intrinsics
    colors: bool
    on_server: bool

    def __call__(self, header: dict[str, Any], arrays: dict[str, np.ndarray], round_trip_ms: float, index: int | None) -> PointCloudResult:
        pixels = image_pixels(self.image) if self.colors else None
        if not self.on_server:
            depth = depth_from_reply(header, arrays, round_trip_ms, index)
            points, rgb = depth_to_points(depth.depth, self.intrinsics, colors=pixels)
            return PointCloudResult(points=points, colors=rgb, depth=depth)
        wire = arrays.get("points")
        if wire is None or wire.ndim != 2 or wire.shape[1] != 3:
            raise InternalError(f"the pointcloud reply has no (N, 3) 'points' array (arrays: {sorted(arrays)})")
        points = np.array(wire, dtype=np.float32)
        if "depth" in arrays:
            depth = depth_from_reply(header, arrays, round_trip_ms, index)
        else:  # Z is the depth: rebuild the map from the points and the image's size
            height, width = (pixels if pixels is not None else image_pixels(self.image)).shape[:2]
            if height * width != len(points):
                raise InternalError(f"{len(points)} points do not match the {height}x{width} image")
            depth = _depth_result(points[:, 2].reshape(height, width).copy(), header, round_trip_ms, index)
        rgb = None
        if self.colors:
            wire_colors = arrays.get("colors")
            if wire_colors is not None and wire_colors.shape == points.shape and wire_colors.dtype == np.uint8:
                rgb = np.array(wire_colors)
            else:
                rgb = np.ascontiguousarray(pixels[..., ::-1]).reshape(-1, 3)
            if len(rgb) != len(points):
                raise InternalError(f"{len(points)} points but {len(rgb)} colours: the image and the reply disagree")
        return PointCloudResult(points=points, colors=rgb, depth=depth)


def from_broker(value: Any, address: str) -> Any:
    """A result stamped with the broker that relayed it (health maps are left as they are)."""
    if isinstance(value, DepthResult):
        return dataclasses.replace(value, broker=address)
    if isinstance(value, PointCloudResult):
        return dataclasses.replace(value, depth=dataclasses.replace(value.depth, broker=address))
    return value


def brokers_health(exchanges: Sequence[Any], addresses: Sequence[str]) -> dict[str, Any]:
    """``{"brokers": [...]}`` from one settled health exchange per broker: each broker's health map, or the
    error that kept it from answering (its message and code)."""
    brokers: list[dict[str, Any]] = []
    for exchange, address in zip(exchanges, addresses):
        if isinstance(exchange.error, ServiceError):
            brokers.append({"address": address, "error": str(exchange.error), "code": exchange.error.code})
        else:
            brokers.append({"address": address, "health": exchange.result()})
    return {"brokers": brokers}


def ready_workers(health: dict[str, Any], model: str | None = None) -> int:
    """How many workers a broker's health map shows ready (not draining, unhealthy or silent) for ``model``
    (a model id such as ``vits`` or ``vits-hypersim``; None: any model)."""
    workers = health.get("workers")
    if isinstance(workers, bool):
        return 0
    if isinstance(workers, int):  # a bare count, as minimal brokers and test doubles answer
        return workers if model is None or model in (health.get("models") or ()) else 0
    count = 0
    for worker in workers if isinstance(workers, list) else ():
        if not isinstance(worker, dict):
            continue
        state = worker.get("state", "draining" if worker.get("draining") else "ready")
        if state == "ready" and (model is None or model in (worker.get("models") or ())):
            count += 1
    return count
