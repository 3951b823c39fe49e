"""``zdepth predict``: images, folders, globs, videos and image URLs in; depth files out.

The command's logic, apart from option parsing: expanding inputs into frames (``inputs``),
running them through a predictor (a server via the client, or an in-process
Engine that is imported only then), writing each output format (``outputs``), and the
summary. numpy and cv2 only at import time.

Images given by ``http://`` or ``https://`` URL are downloaded here, by the
client library's own fetch (``zdepth.client.urls.fetch_image``: at most 64 MiB,
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

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zdepth.client.inputs import (
    DEFAULT_URL_TIMEOUT_S,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    Failure,
    Frame,
    Source,
    count_frames,
    expand_inputs,
    iter_frames,
    reason,
    unique_frames,
    url_name,
)
from zdepth.client.outputs import COLORMAPS, FORMATS, OutputOptions, colorize, depth_to_png16, parse_formats, write_outputs
from zdepth.errors import ZdepthError
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



# ----------------------------------------------------------------------------- predictors

Predictor = Callable[[Iterator[Frame]], Iterator[tuple[Frame, np.ndarray | BaseException]]]
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
        for item in unique_frames(frames()):
            if isinstance(item, Failure):
                summary.failures.append(item)
                advance(1)
            else:
                yield item

    for frame, outcome in predictor(good_frames()):
        if isinstance(outcome, BaseException):
            summary.failures.append(Failure(frame.name, reason(outcome)))
        else:
            try:
                summary.written += len(write_outputs(frame, outcome, options))
                summary.frames += 1
            except (OSError, ZdepthError, ValueError) as exc:
                summary.failures.append(Failure(frame.name, f"writing outputs failed: {reason(exc)}"))
        advance(1)
    summary.seconds = time.perf_counter() - started
    return summary
