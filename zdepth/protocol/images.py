"""Image decoding and validation shared by the client, the CLI and the worker.

numpy and cv2 only (no torch): the client imports this too. Everything that
comes in, encoded bytes or a raw array, leaves as one kind of image: HxWx3
uint8 BGR, C-contiguous, the layout the official pipeline reads with
``cv2.imread``. Encoded images are checked against ``max_pixels`` from their
header before they are decoded, so a small file that declares a huge image
(a decompression bomb) is refused without allocating it; ``inspect_image``
also says, from the header alone, how many bytes decoding will allocate at
its peak, so a server can count them before it starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from zdepth.errors import BadRequest
from zdepth.protocol.image_headers import CHUNK_BYTES, jpeg_frame, sniff

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "EncodedJpeg",
    "ImageInfo",
    "decode_image",
    "device_decodable_jpeg",
    "encode_jpeg",
    "inspect_image",
    "read_image",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
"""About 8660x5773: above any camera frame, far below what would exhaust a worker."""

# Keeps 16-bit depth for our own 1/257 scaling, drops alpha, and (unlike
# IMREAD_UNCHANGED) applies the EXIF orientation as cv2.imread does.
_IMREAD_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR


def decode_image(data: bytes | bytearray | memoryview | np.ndarray, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image as HxWx3 uint8 BGR, C-contiguous.

    ``data`` is either an encoded JPEG, PNG, WebP or BMP file, or a pixel array
    HxW, HxWx1, HxWx3 (BGR) or HxWx4 (BGRA) of uint8 or uint16. Grayscale is
    replicated, alpha dropped, uint16 scaled by 1/257. Anything else raises
    BadRequest naming the offending value. ``max_pixels=None`` disables the
    size limit. The header is checked (``inspect_image``) before any pixel is
    allocated; peak memory is ``inspect_image(data).decode_bytes`` at most.
    """
    info = _inspect(data, max_pixels, require_size=max_pixels is not None)
    if isinstance(data, np.ndarray):
        return _to_bgr8(data)
    view = memoryview(data).cast("B")
    image = cv2.imdecode(np.frombuffer(view, dtype=np.uint8), _IMREAD_FLAGS)
    if image is None:
        raise BadRequest(f"could not decode the {info.format} image ({len(view)} bytes): corrupt or truncated file")
    return _to_bgr8(image)


@dataclass(frozen=True)
class ImageInfo:
    """What ``decode_image`` will make of an input, known before it decodes anything.

    ``width`` and ``height`` are as stored (a JPEG's Exif orientation may swap
    them in the result). ``decode_bytes`` is the most memory decoding and
    converting it allocate at once, beside the input itself: what a server
    must budget for the request before it lets the decoder start.
    """

    format: str  # "JPEG", "PNG", "WebP", "BMP", or "array"
    width: int
    height: int
    decode_bytes: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def inspect_image(data: bytes | bytearray | memoryview | np.ndarray, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Format, size and peak decoding cost of an input of ``decode_image``, from its header only.

    Raises BadRequest, as ``decode_image`` would, for an unknown format, a
    header without readable dimensions, or more than ``max_pixels`` pixels.
    """
    return _inspect(data, max_pixels, require_size=True)


def _inspect(data: bytes | bytearray | memoryview | np.ndarray, max_pixels: int | None, *, require_size: bool) -> ImageInfo:
    """``inspect_image``; without ``require_size`` a header whose dimensions cannot be read gives
    size 0 (no limit to enforce: cv2 may still decode it, as a local caller with no limit wants)."""
    if isinstance(data, np.ndarray):
        _check_array(data)
        height, width = data.shape[:2]
        _check_size(width, height, max_pixels, "image is")
        return ImageInfo("array", width, height, _array_cost(data))
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRequest(f"expected encoded image bytes or a numpy array, got {type(data).__name__}")
    view = memoryview(data)
    if not view.c_contiguous:
        raise BadRequest("encoded image buffer must be contiguous")
    view = view.cast("B")
    if len(view) == 0:
        raise BadRequest("empty image data (0 bytes)")
    fmt, layout = sniff(view)
    if fmt is None:
        raise BadRequest(
            f"not a JPEG, PNG, WebP or BMP file (first bytes {bytes(view[:8])!r}); "
            "send one of those, or a uint8 pixel array"
        )
    if layout is None and not require_size:
        return ImageInfo(fmt, 0, 0, 0)
    if layout is None:
        # Without the dimensions a tiny file could make the decoder allocate gigabytes before any
        # check could refuse it: never decode an image of unknown size under a limit.
        raise BadRequest(f"could not read the {fmt} image's dimensions from its header ({len(view)} bytes): corrupt or truncated file")
    _check_size(layout.width, layout.height, max_pixels, f"{fmt} header declares")
    return ImageInfo(fmt, layout.width, layout.height, layout.cost())


@dataclass(frozen=True, eq=False)
class EncodedJpeg:
    """A JPEG left encoded for a decoder on the GPU (nvjpeg), with its size from the header.

    ``shape`` is the decoded image's (H, W, 3), so size checks and batching
    treat it like the array ``decode_image`` would return.
    """

    data: bytes | bytearray | memoryview
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def decode(self) -> np.ndarray:
        """The same image decoded on the CPU, as ``decode_image`` does."""
        return decode_image(self.data)


def device_decodable_jpeg(data: bytes | bytearray | memoryview, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> EncodedJpeg | None:
    """``data`` as an EncodedJpeg when a GPU decoder can stand in for ``decode_image``, else None.

    That is a complete (ends with the end-of-image marker: nvjpeg decodes a
    truncated file where cv2 refuses it) 8-bit baseline or progressive JPEG in
    grey or colour without an Exif segment (cv2 applies Exif orientation;
    nvjpeg does not). The pixels are close to cv2's, not identical: grey and
    4:4:4 JPEGs agree exactly, 4:2:0 chroma is upsampled differently (a few
    levels on average). Anything else, including data that is no JPEG at all,
    is left to ``decode_image``. A header over ``max_pixels`` raises
    BadRequest, as decoding would.
    """
    view = memoryview(data).cast("B")
    if len(view) < 4 or bytes(view[:3]) != b"\xff\xd8\xff" or bytes(view[-2:]) != b"\xff\xd9":
        return None
    frame = jpeg_frame(view)
    if frame is None or frame.sof not in (0xC0, 0xC2) or frame.precision != 8 or frame.components not in (1, 3) or frame.exif:
        return None
    _check_size(frame.width, frame.height, max_pixels, "JPEG header declares")
    return EncodedJpeg(view, frame.height, frame.width)


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file like ``decode_image``; errors name the path."""
    data = Path(path).read_bytes()
    try:
        return decode_image(data, max_pixels=max_pixels)
    except BadRequest as exc:
        raise BadRequest(f"{os.fspath(path)}: {exc.message}") from exc


def encode_jpeg(bgr: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an image (any array ``decode_image`` accepts, normally HxWx3 uint8 BGR)."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be within 1..100, got {quality}")
    image = decode_image(bgr, max_pixels=None)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"cv2 could not encode a {image.shape} image as JPEG")
    return buf.tobytes()


def _check_array(image: np.ndarray) -> None:
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise BadRequest(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {image.shape}")
    if image.size == 0:
        raise BadRequest(f"empty image, shape {image.shape}")
    if image.dtype != np.uint8 and image.dtype != np.uint16:
        raise BadRequest(f"unsupported pixel dtype {image.dtype}; send uint8 (or uint16) pixels")


def _array_cost(image: np.ndarray) -> int:
    """Peak bytes ``_to_bgr8`` allocates for a valid array: the HxWx3 result, and for uint16 one band
    (a contiguous copy of at most ``CHUNK_BYTES`` and its scaled half)."""
    pixels = image.shape[0] * image.shape[1]
    band = 2 * min(image.nbytes, CHUNK_BYTES) if image.dtype == np.uint16 else 0
    return 3 * pixels + band


def _to_bgr8(image: np.ndarray) -> np.ndarray:
    """Convert a valid pixel array to HxWx3 uint8 BGR, allocating the result and at most one chunk beside it.

    uint16 is scaled by 1/257, rounded, a band of rows at a time: converting the
    whole image at once in numpy built 32-bit temporaries of 12 bytes a sample.
    """
    _check_array(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype == np.uint8:
        if image.ndim == 2:
            return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_GRAY2BGR)
        return np.ascontiguousarray(image)
    height, width = image.shape[:2]
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, CHUNK_BYTES // (image.strides[0] or 1))
    for top in range(0, height, rows):
        band = np.ascontiguousarray(image[top : top + rows])
        # convertScaleAbs rounds v / 257 to nearest: exactly (v + 128) // 257 for every uint16 v (no ties exist).
        scaled = cv2.convertScaleAbs(band, alpha=1 / 257)
        if image.ndim == 2:
            cv2.cvtColor(scaled, cv2.COLOR_GRAY2BGR, dst=out[top : top + rows])
        else:
            out[top : top + rows] = scaled
    return out


def _check_size(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if width <= 0 or height <= 0:
        raise BadRequest(f"{what} an empty image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise BadRequest(
            f"{what} {width}x{height} = {width * height} pixels, above the limit of {max_pixels}; "
            "downscale the image before sending it"
        )
