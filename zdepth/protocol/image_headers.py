"""What an encoded image's header says decoding it will build, read without decoding it.

PNG, JPEG, WebP and BMP headers give the size, the channels and the sample
depth; from those, and from what each decoder holds while it works, comes the
peak memory of a decode, so that a server counts the bytes before it
allocates them (``zdepth.protocol.images.inspect_image``).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace

CHUNK_BYTES = 1 << 20  # uint16 pixels are scaled to uint8 this many source bytes at a time
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_DECODER_OVERHEAD = 1 << 20  # a decoder's own tables and row buffers, beside the per-pixel buffers counted
_PNG_CHUNKS_READ = 64  # chunks read before IDAT for tRNS and acTL; past it, the costlier case is assumed


@dataclass(frozen=True)
class Layout:
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
        chunk = min(decoded, CHUNK_BYTES) if self.sample_bytes > 1 else 0
        return max(imdecode, converted + chunk, 3 * pixels) + _DECODER_OVERHEAD


def sniff(data: memoryview) -> tuple[str | None, Layout | None]:
    """The format and, where the header gives it, the layout of the decoded image."""
    head = bytes(data[:32])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG", _png_layout(data)
    if head.startswith(b"\xff\xd8\xff"):
        frame = jpeg_frame(data, scan=True)
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
        return "BMP", Layout(abs(width), abs(height))
    return None, None


def _png_layout(data: memoryview) -> Layout | None:
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
    return Layout(width, height, 1 if grey else 3, sample_bytes, work)


def _webp_layout(head: bytes) -> Layout | None:
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
    return Layout(size[0], size[1], work=8 if animated else 4)


@dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's frame header (and the markers around it) says about decoding it."""

    sof: int  # the SOF marker: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, others rarer codings
    precision: int  # bits per sample
    width: int
    height: int
    components: int  # 1 grey, 3 YCbCr, 4 CMYK/YCCK
    exif: bool  # an APP1 Exif segment came before the frame (it may rotate the image)
    sampling: tuple[tuple[int, int], ...] = ()  # (horizontal, vertical) sampling factor of each component
    buffered: bool = True  # libjpeg holds every coefficient: progressive, or a first scan without all components

    def layout(self) -> Layout:
        """What cv2 allocates: the result, and with ``buffered`` 2 bytes for each DCT coefficient."""
        work = 0.0
        if self.buffered:
            sampling = [(max(1, h), max(1, v)) for h, v in self.sampling] or [(1, 1)] * max(1, self.components)
            h_max, v_max = max(h for h, _ in sampling), max(v for _, v in sampling)
            pixels = max(1, self.width * self.height)
            # Coefficient arrays cover whole MCUs (8 x sampling pixels), so a thin image costs more a pixel.
            padded = (self.width + 8 * h_max) * (self.height + 8 * v_max)
            work = 2 * sum(h * v for h, v in sampling) / (h_max * v_max) * padded / pixels
        return Layout(
            self.width,
            self.height,
            channels=1 if self.components == 1 else 3,
            sample_bytes=2 if self.precision > 8 else 1,
            work=work,
        )


def jpeg_frame(data: memoryview, *, scan: bool = False) -> JpegFrame | None:
    """The first SOF segment, walking the markers before it; None if there is none.

    With ``scan``, the walk goes on to the first scan header, whose component
    count says whether libjpeg must buffer the whole image's coefficients.
    """
    i, n = 2, len(data)
    copy: bytes | None = None
    exif = False
    frame: JpegFrame | None = None
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
            frame = JpegFrame(
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
