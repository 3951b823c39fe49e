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
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from zdepth.errors import BadRequest

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
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_CHUNK_BYTES = 1 << 20  # uint16 pixels are scaled to uint8 this many source bytes at a time
_DECODER_OVERHEAD = 1 << 20  # a decoder's own tables and row buffers, beside the per-pixel buffers counted
_PNG_CHUNKS_READ = 64  # chunks read before IDAT for tRNS and acTL; past it, the costlier case is assumed


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
    fmt, layout = _sniff(view)
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
    (a contiguous copy of at most ``_CHUNK_BYTES`` and its scaled half)."""
    pixels = image.shape[0] * image.shape[1]
    band = 2 * min(image.nbytes, _CHUNK_BYTES) if image.dtype == np.uint16 else 0
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
    rows = max(1, _CHUNK_BYTES // (image.strides[0] or 1))
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


@dataclass(frozen=True)
class _Layout:
    """What a header says the decoder will build, and so what decoding costs.

    ``channels`` and ``sample_bytes`` describe the array cv2 returns (alpha
    is dropped, grey stays one channel); ``work`` is what the decoder holds
    beside it while decoding, in bytes a pixel (a JPEG's coefficients, a
    WebP's BGRA canvas, an animation's frames).
    """

    width: int
    height: int
    channels: int = 3
    sample_bytes: int = 1
    work: float = 0.0

    def cost(self) -> int:
        """Peak bytes of ``decode_image``: cv2's decode, then its conversion to HxWx3 uint8.

        Measured with cv2 5.0 (tests/test_decode_limits.py): cv2 decodes into
        its own buffer and copies that into the numpy array it returns, so its
        peak is twice the array, or the array plus the decoder's work buffers.
        Converting a uint16 or grey array then allocates the 3-byte result
        beside it.
        """
        pixels = self.width * self.height
        decoded = pixels * self.channels * self.sample_bytes
        imdecode = max(2 * decoded, decoded + math.ceil(self.work * pixels))
        converted = decoded + 3 * pixels if (self.sample_bytes > 1 or self.channels == 1) else decoded
        chunk = min(decoded, _CHUNK_BYTES) if self.sample_bytes > 1 else 0
        return max(imdecode, converted + chunk, 3 * pixels) + _DECODER_OVERHEAD


def _sniff(data: memoryview) -> tuple[str | None, _Layout | None]:
    """The format and, where the header gives it, the layout of the decoded image."""
    head = bytes(data[:32])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG", _png_layout(data)
    if head.startswith(b"\xff\xd8\xff"):
        frame = _jpeg_frame(data, scan=True)
        return "JPEG", None if frame is None else frame.layout()
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP", _webp_layout(head)
    if head.startswith(b"BM") and len(head) >= 26:
        header_size = struct.unpack("<I", head[14:18])[0]
        if header_size == 12:
            width, height = struct.unpack("<HH", head[18:22])
        else:
            width, height = struct.unpack("<ii", head[18:26])
        # cv2 gives one channel for a grey palette, three otherwise; three is counted.
        return "BMP", _Layout(abs(width), abs(height))
    return None, None


def _png_layout(data: memoryview) -> _Layout | None:
    """From IHDR, and the chunks before the first IDAT: tRNS (transparency) and acTL (an animation)."""
    if len(data) < 33 or bytes(data[12:16]) != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    transparency = animated = False
    i = 33  # after the signature (8) and IHDR (25)
    for _ in range(_PNG_CHUNKS_READ):
        if i + 8 > len(data):
            break
        length = struct.unpack(">I", data[i : i + 4])[0]
        kind = bytes(data[i + 4 : i + 8])
        if kind == b"IDAT":
            break
        transparency |= kind == b"tRNS"
        animated |= kind == b"acTL"
        i += 12 + length
    else:  # too many chunks to read them all: assume both
        transparency = animated = True
    grey = colour == 0 and not transparency
    sample_bytes = 2 if depth == 16 else 1
    # An animation is composed on 4-channel canvases: cv2 keeps three of them (measured).
    work = 3 * 4 * sample_bytes if animated else 0
    return _Layout(width, height, 1 if grey else 3, sample_bytes, work)


def _webp_layout(head: bytes) -> _Layout | None:
    chunk = head[12:16]
    size: tuple[int, int] | None = None
    animated = False
    if chunk == b"VP8X" and len(head) >= 30:
        animated = bool(head[20] & 0x02)
        size = int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    elif chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        size = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        size = width & 0x3FFF, height & 0x3FFF
    if size is None:
        return None
    # cv2 decodes to BGRA where there may be alpha, then drops it; an animation keeps two BGRA canvases.
    return _Layout(size[0], size[1], work=8 if animated else 4)


@dataclass(frozen=True)
class _JpegFrame:
    """What a JPEG's frame header (and the markers around it) says about decoding it."""

    sof: int  # the SOF marker: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, others rarer codings
    precision: int  # bits per sample
    width: int
    height: int
    components: int  # 1 grey, 3 YCbCr, 4 CMYK/YCCK
    exif: bool  # an APP1 Exif segment came before the frame (it may rotate the image)
    sampling: tuple[tuple[int, int], ...] = ()  # (horizontal, vertical) sampling factor of each component
    buffered: bool = True  # libjpeg holds every coefficient: progressive, or a first scan without all components

    def layout(self) -> _Layout:
        """What cv2 allocates: the result, and with ``buffered`` 2 bytes for each DCT coefficient."""
        work = 0.0
        if self.buffered:
            sampling = [(max(1, h), max(1, v)) for h, v in self.sampling] or [(1, 1)] * max(1, self.components)
            h_max, v_max = max(h for h, _ in sampling), max(v for _, v in sampling)
            pixels = max(1, self.width * self.height)
            # Coefficient arrays cover whole MCUs (8 x sampling pixels), so a thin image costs more a pixel.
            padded = (self.width + 8 * h_max) * (self.height + 8 * v_max)
            work = 2 * sum(h * v for h, v in sampling) / (h_max * v_max) * padded / pixels
        return _Layout(
            self.width,
            self.height,
            channels=1 if self.components == 1 else 3,
            sample_bytes=2 if self.precision > 8 else 1,
            work=work,
        )


def _jpeg_frame(data: memoryview, *, scan: bool = False) -> _JpegFrame | None:
    """The first SOF segment, walking the markers before it; None if there is none.

    With ``scan``, the walk goes on to the first scan header, whose component
    count says whether libjpeg must buffer the whole image's coefficients.
    """
    i, n = 2, len(data)
    copy: bytes | None = None
    exif = False
    frame: _JpegFrame | None = None
    while i + 4 <= n:
        if data[i] != 0xFF:  # libjpeg skips stray bytes before a marker (with a warning), so the walk must too
            copy = copy if copy is not None else bytes(data)  # find() runs in C; a valid file never gets here
            i = copy.find(b"\xff", i)
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            i += 2
            continue
        if marker == 0xD9:  # end of image
            break
        if marker == 0xDA:  # a scan: its component count decides buffering; before any frame header, no image
            if frame is not None and i + 4 < n:
                frame = replace(frame, buffered=frame.sof in _JPEG_PROGRESSIVE or data[i + 4] < frame.components)
            break
        length = (data[i + 2] << 8) | data[i + 3]
        if marker == 0xE1 and bytes(data[i + 4 : i + 10]) == b"Exif\0\0":
            exif = True
        if marker in _JPEG_SOF and frame is None:
            if i + 9 >= n:
                break
            components = data[i + 9]
            sampling = tuple(
                (data[j] >> 4, data[j] & 0x0F) for j in range(i + 11, min(i + 10 + 3 * components, n), 3)
            )
            frame = _JpegFrame(
                sof=marker,
                precision=data[i + 4],
                height=(data[i + 5] << 8) | data[i + 6],
                width=(data[i + 7] << 8) | data[i + 8],
                components=components,
                exif=exif,
                sampling=sampling,
            )
            if not scan:
                break
        i += 2 + length
    return frame
