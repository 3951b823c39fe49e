"""What the client hands back: depth maps and point clouds, as frozen dataclasses.

numpy only. Arrays are the caller's to keep and modify (each result owns
writable copies), so results stay valid after the next request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["DepthResult", "PointCloudResult"]


@dataclass(frozen=True, eq=False)
class DepthResult:
    """One depth map and where it came from.

    ``depth``: HxW float32, the size of the image sent. Relative models give
    disparity-like values (larger is nearer, no unit); metric models give
    metres. float32 even when the client asked for ``depth_dtype="float16"``,
    which halves the bytes on the wire only (about 3 significant digits).
    ``min`` and ``max`` are those of the depth map (NaN-aware). ``model`` is
    the model id that answered (``vits``, ``vitl-hypersim``) and ``worker``
    the worker's name. ``timings`` holds milliseconds: the server's stages,
    and ``round_trip_ms`` measured by the client from send to reply.
    ``index`` is the frame's position in the input of ``Client.stream``
    (None outside a stream), so a result can be paired with its frame even
    when ``latest_only`` skipped some. ``broker``: the address of the broker
    that relayed the reply (a client given several answers through one at a
    time, and moves to the next when that one fails).
    """

    depth: np.ndarray
    min: float
    max: float
    model: str
    worker: str
    timings: dict[str, float] = field(default_factory=dict)
    index: int | None = None
    broker: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return self.depth.shape  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"DepthResult(shape={self.depth.shape}, min={self.min:.4g}, max={self.max:.4g}, model={self.model!r}, "
            f"worker={self.worker!r}, round_trip_ms={self.timings.get('round_trip_ms', float('nan')):.1f}"
            + (f", index={self.index}" if self.index is not None else "")
            + ")"
        )


@dataclass(frozen=True, eq=False)
class PointCloudResult:
    """A point cloud and the metric depth map it was made from.

    ``points``: (H*W, 3) float32 in the OpenCV camera frame (X right, Y down,
    Z forward; metres), one per pixel in row-major order, including pixels
    whose depth is zero or not finite (filter after). ``colors``: (H*W, 3)
    uint8 RGB from the image, or None when not asked for.
    """

    points: np.ndarray
    colors: np.ndarray | None
    depth: DepthResult

    @property
    def index(self) -> int | None:
        return self.depth.index

    @property
    def broker(self) -> str:
        return self.depth.broker

    def save_ply(self, path) -> None:
        """Write a binary PLY file (with colours when present)."""
        from zdepth.pointcloud import write_ply

        write_ply(path, self.points, self.colors)

    def __repr__(self) -> str:
        return f"PointCloudResult(points={self.points.shape}, colors={self.colors is not None}, depth={self.depth!r})"
