"""What ``zdepth predict`` writes for each frame: ``npy``, ``png16``, ``color`` and ``ply`` files (see
``zdepth.client.files`` for each format)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from zdepth.client.inputs import Frame
from zdepth.errors import ConfigError
from zdepth.pointcloud import Intrinsics, depth_to_points, write_ply

logger = logging.getLogger("zdepth.client.files")

FORMATS = ("npy", "png16", "color", "ply")
SUFFIXES = {"npy": ".npy", "png16": ".depth.png", "color": ".color.png", "ply": ".ply"}
COLORMAPS = {
    name[len("COLORMAP_") :].lower(): getattr(cv2, name) for name in dir(cv2) if name.startswith("COLORMAP_")
}


# ----------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class OutputOptions:
    out_dir: Path
    formats: tuple[str, ...]
    metric: bool
    intrinsics: Intrinsics | None = None
    colormap: str = "inferno"
    depth_scale: float = 1000.0  # png16 units per metre for metric depth
    _sizes_checked: set[tuple[int, int]] = field(default_factory=set, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.colormap not in COLORMAPS:
            raise ConfigError(f"unknown colour map {self.colormap!r}; cv2 has {', '.join(sorted(COLORMAPS))}")
        if not self.depth_scale > 0:
            raise ConfigError(f"depth scale must be > 0 (units per metre), got {self.depth_scale}")
        if "ply" in self.formats:
            if self.intrinsics is None:
                raise ConfigError("--format ply needs camera intrinsics: --fx --fy --cx --cy, or --intrinsics FILE")
            if not self.metric:
                raise ConfigError(
                    "--format ply needs metric depth: pass a metric model such as --model vits-hypersim "
                    "(relative depth has no unit, so it makes no point cloud)"
                )


def _normalized(depth: np.ndarray, *, near_is_large: bool) -> np.ndarray:
    """Depth scaled to 0..1 per image with near at 1; NaN and inf at 0."""
    depth = np.asarray(depth, dtype=np.float32)
    finite = np.isfinite(depth)
    if not finite.any():
        return np.zeros(depth.shape, np.float32)
    low, high = float(depth[finite].min()), float(depth[finite].max())
    scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
    if not near_is_large:
        scaled = 1.0 - scaled
    return np.where(finite, scaled, 0.0).astype(np.float32)


def colorize(depth: np.ndarray, *, metric: bool, colormap: str = "inferno") -> np.ndarray:
    """HxWx3 uint8 BGR: the depth map through a cv2 colour map, near bright, far dark.

    Relative depth is disparity-like (large is near); metric depth is distance
    (small is near), so it is flipped to look the same.
    """
    unit = _normalized(depth, near_is_large=not metric)
    return cv2.applyColorMap((unit * 255.0 + 0.5).astype(np.uint8), COLORMAPS[colormap])


def depth_to_png16(depth: np.ndarray, *, metric: bool, depth_scale: float = 1000.0) -> np.ndarray:
    """HxW uint16: metric depth times ``depth_scale`` (mm by default, clipped), or relative depth scaled to 0..65535."""
    depth = np.asarray(depth, dtype=np.float32)
    if metric:
        scaled = np.nan_to_num(depth * depth_scale, nan=0.0, posinf=65535.0, neginf=0.0)
        if float(scaled.max(initial=0.0)) > 65535.0:
            logger.warning("depth beyond %.3f m clipped in the 16-bit PNG; lower --depth-scale to keep it", 65535 / depth_scale)
        return np.clip(np.rint(scaled), 0, 65535).astype(np.uint16)
    return np.rint(_normalized(depth, near_is_large=True) * 65535.0).astype(np.uint16)


def write_outputs(frame: Frame, depth: np.ndarray, options: OutputOptions) -> list[Path]:
    """Write every requested format for one frame; returns the paths written."""
    written = []
    for fmt in options.formats:
        path = options.out_dir / f"{frame.name}{SUFFIXES[fmt]}"
        if fmt == "npy":
            np.save(path, np.asarray(depth, dtype=np.float32))
        elif fmt == "png16":
            _imwrite(path, depth_to_png16(depth, metric=options.metric, depth_scale=options.depth_scale))
        elif fmt == "color":
            _imwrite(path, colorize(depth, metric=options.metric, colormap=options.colormap))
        elif fmt == "ply":
            assert options.intrinsics is not None
            _check_principal_point(options, depth.shape[:2], frame.name)
            points, colors = depth_to_points(depth, options.intrinsics, colors=frame.image)
            write_ply(path, points, colors)
        written.append(path)
    return written


def _check_principal_point(options: OutputOptions, shape: tuple[int, int], name: str) -> None:
    """Warn (once per image size) when cx, cy lie outside the image: intrinsics for another resolution give a skewed cloud."""
    if shape in options._sizes_checked:
        return
    options._sizes_checked.add(shape)
    k = options.intrinsics
    height, width = shape
    if not (0 <= k.cx <= width and 0 <= k.cy <= height):
        logger.warning(
            "the principal point (--cx %g, --cy %g) lies outside the %dx%d image %s: the intrinsics are probably for "
            "another resolution (scale fx, fy, cx, cy by the ratio of the widths), so its point cloud is skewed",
            k.cx, k.cy, width, height, name,
        )  # fmt: skip


def _imwrite(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cv2 could not encode {path.name}")
    path.write_bytes(buf.tobytes())


def parse_formats(values: Iterable[str]) -> tuple[str, ...]:
    """``["npy,color", "ply"]`` -> ``("npy", "color", "ply")``; ConfigError names an unknown format."""
    formats: list[str] = []
    for value in values:
        for item in value.replace(" ", ",").split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item not in FORMATS:
                raise ConfigError(f"unknown output format {item!r}; choose from {', '.join(FORMATS)}")
            if item not in formats:
                formats.append(item)
    if not formats:
        raise ConfigError(f"no output format given; choose from {', '.join(FORMATS)}")
    return tuple(formats)
