"""Depth map + pinhole intrinsics -> 3D points, and PLY files. numpy only.

Camera frame: X right, Y down, Z forward (OpenCV). A pixel at column u, row v
with depth Z maps to X = (u - cx) Z / fx, Y = (v - cy) Z / fy. Pixel centres
sit at integer coordinates, as in OpenCV calibration.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zdepth.errors import BadRequest, ConfigError

__all__ = ["Intrinsics", "depth_to_points", "write_ply"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels; no distortion (undistort frames first)."""

    fx: float
    fy: float
    cx: float
    cy: float

    def __post_init__(self) -> None:
        for name in ("fx", "fy", "cx", "cy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise BadRequest(f"intrinsics {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise BadRequest(f"intrinsics {name} must be finite, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.fx <= 0 or self.fy <= 0:
            raise BadRequest(f"focal lengths must be positive, got fx={self.fx}, fy={self.fy}")

    @classmethod
    def from_matrix(cls, matrix: Any) -> Intrinsics:
        """From a 3x3 camera matrix K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]."""
        k = np.asarray(matrix, dtype=np.float64)
        if k.shape != (3, 3):
            raise BadRequest(f"a camera matrix must be 3x3, got shape {k.shape}")
        if not np.allclose(k[2], [0.0, 0.0, 1.0]) or k[1, 0] != 0.0:
            raise BadRequest(f"not a pinhole camera matrix (expected [[fx,0,cx],[0,fy,cy],[0,0,1]]): {k.tolist()}")
        if abs(k[0, 1]) > 1e-6 * max(abs(k[0, 0]), 1.0):
            raise BadRequest(f"camera matrices with skew are not supported (K[0,1] = {k[0, 1]})")
        return cls(fx=k[0, 0], fy=k[1, 1], cx=k[0, 2], cy=k[1, 2])

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Intrinsics:
        """From a file holding a 3x3 matrix or fx, fy, cx, cy.

        ``.npy``: a 3x3 or 4-element array. ``.json``: an object with fx, fy,
        cx, cy (optionally under ``camera_intrinsics`` or ``intrinsics``), an
        object with ``K`` / ``camera_matrix``, or a bare list. Anything else:
        text holding 9 or 4 numbers in any layout (spaces, commas, brackets).
        """
        path = Path(path)
        try:
            if path.suffix.lower() == ".npy":
                values: Any = np.load(path, allow_pickle=False)
            elif path.suffix.lower() == ".json":
                values = json.loads(path.read_text())
            else:
                values = [float(t) for t in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", path.read_text())]
            return cls._from_values(values)
        except (BadRequest, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{path}: cannot read camera intrinsics: {exc}") from exc

    @classmethod
    def _from_values(cls, values: Any) -> Intrinsics:
        if isinstance(values, dict):
            for key in ("camera_intrinsics", "intrinsics", "K", "camera_matrix", "matrix"):
                if key in values:
                    return cls._from_values(values[key])
            return cls(**{name: values[name] for name in ("fx", "fy", "cx", "cy")})
        array = np.asarray(values, dtype=np.float64)
        if array.size == 9:
            return cls.from_matrix(array.reshape(3, 3))
        if array.size == 4:
            return cls(*array.ravel().tolist())
        raise ValueError(f"expected a 3x3 matrix or fx, fy, cx, cy; found {array.size} numbers")

    def scaled(self, sx: float, sy: float) -> Intrinsics:
        """The intrinsics for the image resized by (sx, sy), e.g. calibrated at 4K, used at 640x480.

        Matches cv2.resize, which keeps pixel centres aligned: c' = (c + 0.5) s - 0.5.
        """
        if sx <= 0 or sy <= 0:
            raise BadRequest(f"scale factors must be positive, got sx={sx}, sy={sy}")
        return Intrinsics(
            fx=self.fx * sx,
            fy=self.fy * sy,
            cx=(self.cx + 0.5) * sx - 0.5,
            cy=(self.cy + 0.5) * sy - 0.5,
        )

    def as_matrix(self) -> np.ndarray:
        """The 3x3 float64 camera matrix K."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])


def depth_to_points(
    depth: np.ndarray, intrinsics: Intrinsics, colors: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Back-project every pixel of a depth map.

    ``depth``: HxW, metric Z along the optical axis. ``colors``: optional HxWx3
    uint8 BGR image of the same size. Returns ``points`` (H*W, 3) float32 in
    row-major pixel order, and ``colors`` (H*W, 3) uint8 RGB or None. Every
    pixel yields a point, including zero or non-finite depths: filter after.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2 or depth.size == 0:
        raise BadRequest(f"depth must be a non-empty HxW array, got shape {depth.shape}")
    height, width = depth.shape
    z = depth.astype(np.float32, copy=False)
    x = ((np.arange(width, dtype=np.float64) - intrinsics.cx) / intrinsics.fx).astype(np.float32)
    y = ((np.arange(height, dtype=np.float64) - intrinsics.cy) / intrinsics.fy).astype(np.float32)
    points = np.empty((height, width, 3), dtype=np.float32)
    np.multiply(z, x[None, :], out=points[..., 0])
    np.multiply(z, y[:, None], out=points[..., 1])
    points[..., 2] = z
    rgb = None
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != (height, width, 3) or colors.dtype != np.uint8:
            raise BadRequest(
                f"colors must be an HxWx3 uint8 BGR image matching the depth map {depth.shape}, "
                f"got {colors.dtype} {colors.shape}"
            )
        rgb = np.ascontiguousarray(colors[..., ::-1]).reshape(-1, 3)
    return points.reshape(-1, 3), rgb


def write_ply(path: str | os.PathLike[str], points: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Write a binary little-endian PLY: float x, y, z and, if given, uchar red, green, blue.

    ``points``: (N, 3), cast to float32. ``colors``: (N, 3) uint8 RGB. zdepth
    has no reader: viewers and libraries (Open3D, MeshLab, plyfile) read these.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got shape {points.shape}")
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != points.shape or colors.dtype != np.uint8:
            raise ValueError(f"colors must be (N, 3) uint8 matching points {points.shape}, got {colors.dtype} {colors.shape}")
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertices = np.empty(len(points), dtype=fields)
    for i, axis in enumerate("xyz"):
        vertices[axis] = points[:, i]
    if colors is not None:
        for i, channel in enumerate(("red", "green", "blue")):
            vertices[channel] = colors[:, i]
    header = ["ply", "format binary_little_endian 1.0", "comment written by zdepth", f"element vertex {len(points)}"]
    header += [f"property {'float' if dtype == '<f4' else 'uchar'} {name}" for name, dtype in fields]
    header.append("end_header")
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(vertices.tobytes())
