"""``zdepth predict``: images, folders, globs, videos and image URLs in; depth files out.

The command's logic, apart from option parsing: expanding inputs into frames,
running them through a predictor (a server via the client, or an in-process
Engine that is imported only then), writing each output format, and the
summary. numpy and cv2 only at import time.

Images given by ``http://`` or ``https://`` URL are downloaded here, by the
client library's own fetch (``zdepth._requests.fetch_image``: at most 64 MiB,
within the timeout, redirects only to http(s)), once per image: the bytes go to
the server as any image file's would, and the pixels stay here for the point
cloud's colours. A download that fails is that image's failure, like an
unreadable file. The server never fetches.

Outputs for a frame named ``NAME`` (an image's stem, the stem of a URL's last
path segment, or ``STEM_000123`` for frame 123 of a video) in the output folder:

- ``npy``: ``NAME.npy``, the HxW float32 depth map as the model gives it.
- ``png16``: ``NAME.depth.png``, 16-bit grayscale. Metric depth is stored in
  units of 1/``depth_scale`` metre (millimetres by default, clipped at
  65.535 m); relative depth, which has no unit, is scaled per image so its
  minimum is 0 and its maximum 65535.
- ``color``: ``NAME.color.png``, the depth through a cv2 colour map, near
  bright and far dark for both kinds of model.
- ``ply``: ``NAME.ply``, a binary point cloud (x, y, z in metres plus the
  image's RGB per point, one point per pixel); needs intrinsics and a metric model.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from zdepth.client.urls import URL_SCHEMES, _shown_url, fetch_image, is_url
from zdepth.errors import ConfigError, ZdepthError
from zdepth.protocol.images import decode_image
from zdepth.pointcloud import Intrinsics, depth_to_points, write_ply
from zdepth.models import DEFAULT_INPUT_SIZE, is_metric_model, split_model_id
from zdepth.protocol import OP_METRIC, OP_RELATIVE

__all__ = [
    "COLORMAPS",
    "FORMATS",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Failure",
    "Frame",
    "OutputOptions",
    "Source",
    "Summary",
    "colorize",
    "count_frames",
    "depth_to_png16",
    "expand_inputs",
    "iter_frames",
    "local_predictor",
    "parse_formats",
    "remote_predictor",
    "run",
    "url_name",
    "write_outputs",
]

logger = logging.getLogger(__name__)

FORMATS = ("npy", "png16", "color", "ply")
SUFFIXES = {"npy": ".npy", "png16": ".depth.png", "color": ".color.png", "ply": ".ply"}
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".pgm", ".ppm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".mjpeg", ".mjpg"})
COLORMAPS = {
    name[len("COLORMAP_") :].lower(): getattr(cv2, name) for name in dir(cv2) if name.startswith("COLORMAP_")
}


# ----------------------------------------------------------------------------- inputs


DEFAULT_URL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Source:
    """One input: a file (``video`` for files read frame by frame), or an image by ``url`` (``path`` is then its name)."""

    path: Path
    video: bool
    url: str | None = None

    @property
    def shown(self) -> str:
        """The input for messages: the path, or the URL without credentials or query."""
        return _shown_url(self.url) if self.url is not None else os.fspath(self.path)


@dataclass(frozen=True)
class Frame:
    """One image to predict: the output name, the pixels (HxWx3 uint8 BGR) and what to send a server."""

    name: str
    image: np.ndarray
    payload: Any  # encoded bytes for image files (smaller on the wire), the pixels for video frames


@dataclass(frozen=True)
class Failure:
    name: str
    reason: str


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


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _kind(path: Path) -> bool | None:
    """True for a video, False for an image, None for anything else."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES:
        return False
    return None


def url_name(url: str) -> str:
    """The file name a URL's image is saved under: its last path segment (``.../photos/cat.jpg?w=640`` -> ``cat.jpg``),
    else its host; characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``."""
    import re
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        segment = urllib.parse.unquote(parts.path.rstrip("/").rpartition("/")[2]) or parts.hostname or ""
    except ValueError:
        segment = ""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", segment).strip(".")
    return name or "image"


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Source], list[Failure]]:
    """Files, folders (their images and videos, sorted, not recursive), globs and image URLs, in the order given.

    Files named explicitly are taken whatever their suffix (a video suffix
    makes them videos); inside folders and globs only known image and video
    suffixes count. ``http://`` and ``https://`` URLs are images, fetched when
    their turn comes; other schemes, and URLs of videos, are failures. Inputs
    that match nothing become failures. A file or URL reached twice is taken
    once.
    """
    sources: list[Source] = []
    failures: list[Failure] = []
    seen: set[Path | str] = set()

    def add(path: Path, *, explicit: bool) -> None:
        kind = _kind(path)
        if kind is None and not explicit:
            return
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            sources.append(Source(path, bool(kind)))

    for item in inputs:
        text = os.fspath(item)
        if is_url(text):
            scheme = text.partition("://")[0].lower()
            name = url_name(text)
            if scheme not in URL_SCHEMES:
                failures.append(Failure(_shown_url(text), f"only {' and '.join(f'{s}://' for s in URL_SCHEMES)} URLs are fetched; for a local file give its path"))
            elif _kind(Path(name)):
                failures.append(Failure(_shown_url(text), "videos are not fetched by URL; download the file and give its path"))
            elif text not in seen:
                seen.add(text)
                sources.append(Source(Path(name), False, url=text))
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            before = len(sources)
            for child in sorted(path.iterdir()):
                if child.is_file():
                    add(child, explicit=False)
            if len(sources) == before:
                failures.append(Failure(text, "folder holds no image or video files"))
        elif path.is_file():
            add(path, explicit=True)
        elif _is_glob(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            before = len(sources)
            for match in matches:
                if Path(match).is_file():
                    add(Path(match), explicit=False)
            if len(sources) == before:
                failures.append(Failure(text, "no image or video file matches this pattern"))
        else:
            failures.append(Failure(text, "no such file or folder"))
    return sources, failures


def count_frames(source: Source, every: int = 1) -> int | None:
    """How many frames ``iter_frames`` will give (a video's container count may be missing or approximate)."""
    if not source.video:
        return 1
    capture = cv2.VideoCapture(os.fspath(source.path))
    try:
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    finally:
        capture.release()
    return (total + every - 1) // every if total > 0 else None


def iter_frames(source: Source, every: int = 1, *, url_timeout: float = DEFAULT_URL_TIMEOUT_S) -> Iterator[Frame | Failure]:
    """An image's one frame (a URL's downloaded within ``url_timeout`` seconds), or every ``every``-th frame of a video
    as ``STEM_000123`` (frame index)."""
    stem = source.path.name[: -len(source.path.suffix)] if source.path.suffix else source.path.name
    if source.url is not None:
        try:
            data = fetch_image(source.url, timeout=url_timeout)
            yield Frame(stem, decode_image(data), data)
        except ZdepthError as exc:
            yield Failure(source.shown, _reason(exc))
        return
    if not source.video:
        try:
            data = source.path.read_bytes()
            yield Frame(stem, decode_image(data), data)
        except (OSError, ZdepthError) as exc:
            yield Failure(os.fspath(source.path), _reason(exc))
        return
    capture = cv2.VideoCapture(os.fspath(source.path))
    try:
        if not capture.isOpened():
            yield Failure(os.fspath(source.path), "cv2 cannot open this video (unsupported codec or not a video)")
            return
        index = 0
        while True:
            if index % every:
                if not capture.grab():  # skip without decoding
                    break
            else:
                ok, image = capture.read()
                if not ok:
                    break
                try:
                    image = decode_image(image)
                except ZdepthError as exc:
                    yield Failure(f"{source.path}#{index}", _reason(exc))
                else:
                    yield Frame(f"{stem}_{index:06d}", image, image)
            index += 1
        if index == 0:
            yield Failure(os.fspath(source.path), "the video has no readable frame")
    finally:
        capture.release()


def _unique(frames: Iterable[Frame | Failure]) -> Iterator[Frame | Failure]:
    """Keep output names apart when two inputs share a stem (a.jpg and a.png, or x/1.jpg and y/1.jpg)."""
    used: set[str] = set()
    for item in frames:
        if isinstance(item, Frame):
            name, n = item.name, 1
            while name in used:
                n += 1
                name = f"{item.name}-{n}"
            used.add(name)
            if name != item.name:
                item = Frame(name, item.image, item.payload)
        yield item


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


# ----------------------------------------------------------------------------- predictors

Predictor = Callable[[Iterator[Frame]], Iterator[tuple[Frame, "np.ndarray | BaseException"]]]
"""Frames in, (frame, depth or the exception that failed it) out, in order."""


def local_predictor(
    model: str,
    *,
    device: str | None = None,
    precision: str | None = None,
    weights_dir: str | None = None,
    download: bool = False,
    input_size: int = DEFAULT_INPUT_SIZE,
    max_depth: float | None = None,
) -> Predictor:
    """In this process, with the engine (imports torch now). Loads the model before returning, so a
    missing checkpoint fails once, up front, with the engine's message."""
    from zdepth.engine.inference import Engine

    if device is None or device == "auto":
        import torch

        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    engine = Engine(device=device, precision=precision, weights_dir=weights_dir, download=download)
    engine.load(model)
    metric = is_metric_model(model)

    def predict(frames: Iterator[Frame]) -> Iterator[tuple[Frame, Any]]:
        for frame in frames:
            try:
                depth = engine.infer([frame.image], model, input_size=input_size, max_depth=max_depth if metric else None)[0]
            except ZdepthError as exc:
                yield frame, exc
            else:
                yield frame, depth

    return predict


def remote_predictor(
    client: Any, model: str | None, *, metric: bool, input_size: int | None = None, max_depth: float | None = None, max_in_flight: int = 4
) -> Predictor:
    """Through a server, pipelined (``Client.stream``, several frames in flight).

    ``model=None`` lets the broker pick; the client must then be made with
    ``encoder=None``, since a call's None falls back to the client's default.
    """
    op = OP_METRIC if metric else OP_RELATIVE
    kwargs: dict[str, Any] = {"input_size": input_size}
    if model is None:
        kwargs["encoder"] = None
    else:
        encoder, dataset = split_model_id(model)
        kwargs["encoder"] = encoder
        if dataset:
            kwargs["dataset"] = dataset
    if metric:
        kwargs["max_depth"] = max_depth

    def predict(frames: Iterator[Frame]) -> Iterator[tuple[Frame, Any]]:
        held: dict[int, Frame] = {}

        def payloads() -> Iterator[Any]:
            for index, frame in enumerate(frames):
                held[index] = frame
                yield frame.payload

        for result in client.stream(payloads(), op=op, max_in_flight=max_in_flight, return_exceptions=True, **kwargs):
            if isinstance(result, BaseException):
                # Errors come back in order: the oldest frame still held is the one that failed.
                index = min(held)
                yield held.pop(index), result
            else:
                yield held.pop(result.index), result.depth

    return predict


# ----------------------------------------------------------------------------- the run


@dataclass
class Summary:
    frames: int = 0
    written: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ms_per_frame(self) -> float | None:
        return 1000.0 * self.seconds / self.frames if self.frames else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "written": self.written,
            "failed": len(self.failures),
            "failures": [{"input": f.name, "reason": f.reason} for f in self.failures],
            "seconds": round(self.seconds, 4),
            "ms_per_frame": None if self.ms_per_frame is None else round(self.ms_per_frame, 3),
        }


def run(
    sources: Sequence[Source],
    predictor: Predictor,
    options: OutputOptions,
    *,
    every: int = 1,
    advance: Callable[[int], None] = lambda n: None,
    url_timeout: float = DEFAULT_URL_TIMEOUT_S,
) -> Summary:
    """Predict every frame of ``sources`` and write its outputs; per-frame failures are collected, not raised.

    ``advance(n)`` is called as frames are done (for a progress bar); images
    by URL are downloaded within ``url_timeout`` seconds each.
    """
    options.out_dir.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    started = time.perf_counter()

    def frames() -> Iterator[Frame]:
        for source in sources:
            yield from iter_frames(source, every, url_timeout=url_timeout)

    def good_frames() -> Iterator[Frame]:
        for item in _unique(frames()):
            if isinstance(item, Failure):
                summary.failures.append(item)
                advance(1)
            else:
                yield item

    for frame, outcome in predictor(good_frames()):
        if isinstance(outcome, BaseException):
            summary.failures.append(Failure(frame.name, _reason(outcome)))
        else:
            try:
                summary.written += len(write_outputs(frame, outcome, options))
                summary.frames += 1
            except (OSError, ZdepthError, ValueError) as exc:
                summary.failures.append(Failure(frame.name, f"writing outputs failed: {_reason(exc)}"))
        advance(1)
    summary.seconds = time.perf_counter() - started
    return summary


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    code = getattr(exc, "code", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"[{code}] {text}" if isinstance(code, str) else text
