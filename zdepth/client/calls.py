"""A ``Call``: what one client method (or one frame of a stream) asks of the service, built and ready to send.

Building turns the caller's image and options into the frames after the
request header (params, image) and the model id; the header itself (its id,
key and timeout) is written per attempt by the pipeline. numpy and cv2 only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from zdepth import models
from zdepth.errors import BadRequest
from zdepth.pointcloud import Intrinsics
from zdepth.protocol import OP_METRIC, OP_POINTCLOUD, OP_RELATIVE
from zdepth.protocol.codec import image_descriptor
from zdepth.protocol.images import decode_image, encode_jpeg

WIRE_FORMATS = ("raw", "jpeg")
JPEG_QUALITY = 90
STREAM_OPS = (OP_RELATIVE, OP_METRIC, OP_POINTCLOUD)


@dataclass(frozen=True)
class Call:
    """A request ready to send but for its header; ``finish`` turns the reply into a result.

    Each send of it is an attempt, with its own header (id, deadline); the
    pipeline tracks the call and its attempts as an ``Exchange``.
    """

    op: str
    model: str | None
    body: tuple[Any, ...]  # frames after the header: params, image
    finish: Callable[[dict[str, Any], dict[str, np.ndarray], float, int | None], Any]
    created: float = field(default_factory=time.monotonic)  # when building began: the call's time bound starts here


def model_id(op: str, encoder: str | None, dataset: str | None) -> str | None:
    """``vits`` for relative depth, ``vits-hypersim`` for metric depth; None lets the broker pick."""
    if encoder is None:
        return None
    if op == OP_RELATIVE:
        return encoder
    return f"{encoder}-{dataset or models.DEFAULT_DATASET}"


def prepare_image(image: Any, wire_format: str) -> tuple[dict[str, Any], Any]:
    """The image descriptor for the params frame and the image frame.

    Arrays travel raw (``wire_format="raw"``) or as JPEG at quality 90
    (``"jpeg"``, smaller on the wire, lossy); encoded bytes and files travel
    as they are.
    """
    if isinstance(image, (str, os.PathLike)):
        return image_descriptor(Path(image).read_bytes())
    if isinstance(image, np.ndarray):
        if wire_format == "jpeg":
            return image_descriptor(encode_jpeg(image, JPEG_QUALITY))
        return image_descriptor(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return image_descriptor(image)
    raise TypeError(
        f"image must be a BGR uint8 numpy array, JPEG/PNG bytes, a file path or an http(s) URL, got {type(image).__name__}"
    )


def image_pixels(image: Any) -> np.ndarray:
    """The image as HxWx3 uint8 BGR on this side (for point cloud colours and sizes)."""
    if isinstance(image, (str, os.PathLike)):
        image = Path(image).read_bytes()
    return decode_image(image, max_pixels=None)


def coerce_intrinsics(intrinsics: Any) -> Intrinsics:
    """Intrinsics from an ``Intrinsics``, a mapping with fx, fy, cx, cy, a 4-sequence or a 3x3 matrix."""
    if isinstance(intrinsics, Intrinsics):
        return intrinsics
    if isinstance(intrinsics, Mapping):
        missing = [name for name in ("fx", "fy", "cx", "cy") if name not in intrinsics]
        if missing:
            raise BadRequest(f"intrinsics mapping lacks {missing}; give fx, fy, cx and cy in pixels")
        return Intrinsics(*(intrinsics[name] for name in ("fx", "fy", "cx", "cy")))
    try:
        array = np.asarray(intrinsics, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"intrinsics must be fx, fy, cx, cy or a 3x3 matrix, got {intrinsics!r}") from exc
    if array.shape == (3, 3):
        return Intrinsics.from_matrix(array)
    if array.shape == (4,):
        return Intrinsics(*array.tolist())
    raise BadRequest(
        f"intrinsics must be an Intrinsics, a dict with fx, fy, cx, cy, a 4-sequence or a 3x3 matrix; got shape {array.shape}"
    )
