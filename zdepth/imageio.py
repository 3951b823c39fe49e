"""Image decoding and validation shared by the client, the CLI and the worker.

numpy and cv2 only (no torch): the client imports this too. Everything that
comes in, encoded bytes or a raw array, leaves as one kind of image: HxWx3
uint8 BGR, C-contiguous, the layout the official pipeline reads with
``cv2.imread``. Encoded images are checked against ``max_pixels`` from their
header before they are decoded, so a small file that declares a huge image
(a decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from zdepth.errors import BadRequest

__all__ = ["DEFAULT_MAX_PIXELS", "EncodedJpeg", "decode_image", "device_decodable_jpeg", "encode_jpeg", "read_image"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
"""About 8660x5773: above any camera frame, far below what would exhaust a worker."""

# Keeps 16-bit depth for our own 1/257 scaling, drops alpha, and (unlike
# IMREAD_UNCHANGED) applies the EXIF orientation as cv2.imread does.
_IMREAD_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def decode_image(data: bytes | bytearray | memoryview | np.ndarray, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image as HxWx3 uint8 BGR, C-contiguous.

    ``data`` is either an encoded JPEG, PNG, WebP or BMP file, or a pixel array
    HxW, HxWx1, HxWx3 (BGR) or HxWx4 (BGRA) of uint8 or uint16. Grayscale is
    replicated, alpha dropped, uint16 scaled by 1/257. Anything else raises
    BadRequest naming the offending value. ``max_pixels=None`` disables the
    size limit.
    """
    if isinstance(data, np.ndarray):
        return _to_bgr8(data, max_pixels)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRequest(f"expected encoded image bytes or a numpy array, got {type(data).__name__}")
    view = memoryview(data)
    if not view.c_contiguous:
        raise BadRequest("encoded image buffer must be contiguous")
    view = view.cast("B")
    if len(view) == 0:
        raise BadRequest("empty image data (0 bytes)")
    fmt, size = _sniff(view)
    if fmt is None:
        raise BadRequest(
            f"not a JPEG, PNG, WebP or BMP file (first bytes {bytes(view[:8])!r}); "
            "send one of those, or a uint8 pixel array"
        )
    if size is not None:
        _check_size(size[0], size[1], max_pixels, f"{fmt} header declares")
    elif max_pixels is not None:
        # Without the dimensions a tiny file could make the decoder allocate gigabytes before the
        # pixel check below could refuse it: never decode an image of unknown size under a limit.
        raise BadRequest(f"could not read the {fmt} image's dimensions from its header ({len(view)} bytes): corrupt or truncated file")
    image = cv2.imdecode(np.frombuffer(view, dtype=np.uint8), _IMREAD_FLAGS)
    if image is None:
        raise BadRequest(f"could not decode the {fmt} image ({len(view)} bytes): corrupt or truncated file")
    return _to_bgr8(image, max_pixels)


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
    frame = _jpeg_frame(view)
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
    image = _to_bgr8(bgr, None)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"cv2 could not encode a {image.shape} image as JPEG")
    return buf.tobytes()


def _to_bgr8(image: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """Validate a pixel array and convert it to HxWx3 uint8 BGR."""
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise BadRequest(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {image.shape}")
    if image.size == 0:
        raise BadRequest(f"empty image, shape {image.shape}")
    if image.dtype != np.uint8 and image.dtype != np.uint16:
        raise BadRequest(f"unsupported pixel dtype {image.dtype}; send uint8 (or uint16) pixels")
    _check_size(image.shape[1], image.shape[0], max_pixels, "image is")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype == np.uint16:
        # Rounded v / 257 maps 0..65535 onto 0..255 exactly.
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(image)


def _check_size(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if width <= 0 or height <= 0:
        raise BadRequest(f"{what} an empty image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise BadRequest(
            f"{what} {width}x{height} = {width * height} pixels, above the limit of {max_pixels}; "
            "downscale the image before sending it"
        )


def _sniff(data: memoryview) -> tuple[str | None, tuple[int, int] | None]:
    """The format and, where the header gives it cheaply, the declared (width, height)."""
    head = bytes(data[:32])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(head) >= 24 and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return "PNG", (width, height)
        return "PNG", None
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG", _jpeg_size(data)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP", _webp_size(head)
    if head.startswith(b"BM") and len(head) >= 26:
        header_size = struct.unpack("<I", head[14:18])[0]
        if header_size == 12:
            width, height = struct.unpack("<HH", head[18:22])
        else:
            width, height = struct.unpack("<ii", head[18:26])
        return "BMP", (abs(width), abs(height))
    return None, None


def _jpeg_size(data: memoryview) -> tuple[int, int] | None:
    """(width, height) from the first SOF segment."""
    frame = _jpeg_frame(data)
    return None if frame is None else (frame.width, frame.height)


@dataclass(frozen=True)
class _JpegFrame:
    """What a JPEG's frame header (and the markers before it) says about decoding it."""

    sof: int  # the SOF marker: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, others rarer codings
    precision: int  # bits per sample
    width: int
    height: int
    components: int  # 1 grey, 3 YCbCr, 4 CMYK/YCCK
    exif: bool  # an APP1 Exif segment came before the frame (it may rotate the image)


def _jpeg_frame(data: memoryview) -> _JpegFrame | None:
    """The first SOF segment, walking the markers before it; None if there is none."""
    i, n = 2, len(data)
    copy: bytes | None = None
    exif = False
    while i + 9 <= n:
        if data[i] != 0xFF:  # libjpeg skips stray bytes before a marker (with a warning), so the walk must too
            copy = copy if copy is not None else bytes(data)  # find() runs in C; a valid file never gets here
            i = copy.find(b"\xff", i)
            if i < 0:
                return None
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        length = (data[i + 2] << 8) | data[i + 3]
        if marker == 0xE1 and bytes(data[i + 4 : i + 10]) == b"Exif\0\0":
            exif = True
        if marker in _JPEG_SOF:
            return _JpegFrame(
                sof=marker,
                precision=data[i + 4],
                height=(data[i + 5] << 8) | data[i + 6],
                width=(data[i + 7] << 8) | data[i + 8],
                components=data[i + 9] if i + 9 < n else 0,
                exif=exif,
            )
        i += 2 + length
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None
