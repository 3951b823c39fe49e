"""Image decoding is bounded before it starts, and the pixel limit is one a worker can serve.

Three layers: the decode path's real peak memory (measured in a child process
from its peak RSS) against what the worker counts for it before decoding;
a worker against the fake broker of test_worker, refusing from the header
alone and counting decode peaks against its byte bound; and a real broker and
worker with default limits serving an image of exactly the pixel limit.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest

from procs import start_live_server
from test_worker import GatedEngine, broker, ctx, engine, make_config, start  # noqa: F401 - fixtures
from zdepth import protocol
from zdepth.config import WorkerConfig
from zdepth.errors import BadRequest
from zdepth.protocol import images as imageio
from zdepth.worker import max_pixels

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 4096 * 4096  # the default: a float32 depth map of this many pixels is exactly one 64 MiB message


def png(width: int, height: int, *, depth: int = 8, colour: int = 2, body: bytes | None = None) -> bytes:
    """A PNG of zeros (or, with ``body``, those bytes after IHDR: a header whose data is garbage)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if body is None:
        row = bytes(1 + width * channels * depth // 8)
        body = chunk(b"IDAT", zlib.compress(row * height, 9)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body


# ----------------------------------------------------------------------------- the decode path, measured

MEASURE = textwrap.dedent(
    r'''
    """Decode each case, print its peak RSS growth and what the worker counts for it, as JSON lines."""
    import ctypes, io, json, struct, sys, zlib
    import cv2, numpy as np
    from PIL import Image
    from zdepth.protocol import images as imageio
    from zdepth.worker import held_bytes

    W, H = int(sys.argv[1]), int(sys.argv[2])
    libc = ctypes.CDLL("libc.so.6")

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    def enc(ext, array, *params):
        ok, buf = cv2.imencode(ext, array, list(params))
        assert ok
        return buf.tobytes()

    def pil(image, fmt, **options):
        out = io.BytesIO()
        image.save(out, fmt, **options)
        return out.getvalue()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def apng(depth, colour, frames):
        """An animated PNG (acTL, fcTL, fdAT), which cv2 composes on 4-channel canvases."""
        channels = {0: 1, 2: 3, 6: 4}[colour]
        data = zlib.compress(bytes(H * (1 + W * channels * depth // 8)), 9)
        out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, depth, colour, 0, 0, 0))
        out += chunk(b"acTL", struct.pack(">II", frames, 0))
        control = lambda seq: chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, W, H, 0, 0, 1, 10, 0, 0))
        out += control(0) + chunk(b"IDAT", data)
        for frame in range(1, frames):
            out += control(2 * frame - 1) + chunk(b"fdAT", struct.pack(">I", 2 * frame) + data)
        return out + chunk(b"IEND", b"")

    z8 = lambda c: np.zeros((H, W, c) if c > 1 else (H, W), np.uint8)
    z16 = lambda c: np.zeros((H, W, c) if c > 1 else (H, W), np.uint16)
    progressive = (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    full_chroma = (cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444)
    cases = {
        "png rgb16": enc(".png", z16(3)),
        "png rgba16": enc(".png", z16(4)),
        "png grey16": enc(".png", z16(1)),
        "png rgb8": enc(".png", z8(3)),
        "png grey8": enc(".png", z8(1)),
        "png 1-bit": pil(Image.new("1", (W, H)), "PNG"),
        "png palette": pil(Image.new("P", (W, H)), "PNG"),
        "png grey+alpha": pil(Image.new("LA", (W, H)), "PNG"),
        "png grey tRNS": pil(Image.new("L", (W, H)), "PNG", transparency=0),
        "apng rgba16": apng(16, 6, 3),
        "apng rgb8": apng(8, 2, 3),
        "jpeg 4:2:0": enc(".jpg", z8(3)),
        "jpeg 4:4:4": enc(".jpg", z8(3), *full_chroma),
        "jpeg progressive": enc(".jpg", z8(3), *progressive),
        "jpeg progressive 4:4:4": enc(".jpg", z8(3), *progressive, *full_chroma),
        "jpeg grey": enc(".jpg", z8(1)),
        "jpeg cmyk": pil(Image.new("CMYK", (W, H)), "JPEG"),
        "jpeg cmyk progressive": pil(Image.new("CMYK", (W, H)), "JPEG", progressive=True),
        "webp lossy": enc(".webp", z8(3), cv2.IMWRITE_WEBP_QUALITY, 50),
        "webp alpha": enc(".webp", z8(4), cv2.IMWRITE_WEBP_QUALITY, 101),
        "webp animated": pil(Image.new("RGB", (W, H)), "WEBP", save_all=True, lossless=True,
                             append_images=[Image.new("RGB", (W, H), (255, 0, 0))]),
        "bmp 24": enc(".bmp", z8(3)),
        "bmp 32": enc(".bmp", z8(4)),
        "bmp 1-bit": pil(Image.new("1", (W, H)), "BMP"),
        "array uint16 bgra": z16(4),
        "array uint16 grey": z16(1),
        "array uint8 bgra": z8(4),
        "array uint8 grey": z8(1),
    }
    for data in cases.values():  # first calls set up thread pools and tables once per process: not per image
        imageio.decode_image(data[:64, :64] if isinstance(data, np.ndarray) else data, max_pixels=None)
    for name, data in cases.items():
        info = imageio.inspect_image(data, max_pixels=None)
        counted = held_bytes(data, info) - memoryview(data).nbytes
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        base = status("VmRSS")
        image = imageio.decode_image(data, max_pixels=None)
        peak = status("VmHWM") - base
        assert image.shape == (H, W, 3) and image.dtype == np.uint8, (name, image.shape, image.dtype)
        del image
        print(json.dumps({"case": name, "peak": peak, "counted": counted}), flush=True)
    '''
)


def measure_decode_peaks(width: int, height: int) -> dict[str, dict]:
    # Large blocks mapped and unmapped one by one, so that each case starts from the same resident size.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(width), str(height)], env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return {row["case"]: row for row in rows}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read and reset through Linux /proc")
def test_decoding_never_allocates_more_than_the_worker_counts_for_it():
    """Every format and bit depth the worker accepts: the peak of decode + conversion stays within
    what the worker counts against its byte bound before decoding, and the count is not wildly
    above it either (a bound that overcounts turns good requests away)."""
    width, height = 1600, 1000
    pixels = width * height
    peaks = measure_decode_peaks(width, height)
    assert len(peaks) == 28
    page_slack = 64 * 1024  # resident sizes move by whole pages
    report = "\n".join(f"{c:24s} peak {r['peak'] / pixels:5.2f} B/px, counted {r['counted'] / pixels:5.2f}" for c, r in peaks.items())
    for case, row in peaks.items():
        assert row["peak"] <= row["counted"] + page_slack, f"{case} allocated more than counted\n{report}"
        if case not in ("png grey tRNS", "apng rgb8", "bmp 1-bit"):  # counted as colour or 4-channel, conservatively
            assert row["counted"] <= 1.25 * row["peak"] + 2 * 1024 * 1024, f"{case} is counted far above its peak\n{report}"
    # The 16-bit PNG of the report: its conversion to 8 bits allocated 30 bytes a pixel; now cv2's own 12.
    assert peaks["png rgb16"]["peak"] <= 12.5 * pixels, report
    assert peaks["array uint16 bgra"]["peak"] <= 3 * pixels + 2 * 1024 * 1024, report  # the result, and one band


@pytest.mark.parametrize("shape", [(700, 800, 4), (700, 800, 3), (1500, 900), (1500, 900, 1), (3, 5, 4)])
def test_uint16_converts_in_bands_exactly(shape):
    """Band by band (the arrays span several bands) gives the rounded v / 257 of every value."""
    wide = np.random.default_rng(1).integers(0, 65536, shape, dtype=np.uint16)
    wide.reshape(-1)[:65536] = np.arange(min(65536, wide.size), dtype=np.uint16)
    expected = ((wide.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if expected.ndim == 3 and expected.shape[2] == 4:
        expected = expected[:, :, :3]
    if expected.ndim == 3 and expected.shape[2] == 1:
        expected = expected[:, :, 0]
    if expected.ndim == 2:
        expected = np.repeat(expected[:, :, None], 3, axis=2)
    image = imageio.decode_image(wide, max_pixels=None)
    assert image.dtype == np.uint8 and image.flags.c_contiguous
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(imageio.decode_image(wide[:, ::-1], max_pixels=None), expected[:, ::-1])


def test_inspect_image_reads_the_layout_from_the_header():
    rgb16 = imageio.inspect_image(png(300, 200, depth=16))
    grey16 = imageio.inspect_image(png(300, 200, depth=16, colour=0))
    rgb8 = imageio.inspect_image(png(300, 200))
    assert (rgb16.format, rgb16.width, rgb16.height) == ("PNG", 300, 200)
    assert rgb16.decode_bytes > grey16.decode_bytes and rgb16.decode_bytes > rgb8.decode_bytes
    jpeg = cv2.imencode(".jpg", np.zeros((200, 300, 3), np.uint8))[1].tobytes()
    progressive = cv2.imencode(".jpg", np.zeros((200, 300, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1,
                               cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])[1].tobytes()  # fmt: skip
    assert imageio.inspect_image(progressive).decode_bytes > imageio.inspect_image(jpeg).decode_bytes
    with pytest.raises(BadRequest, match="9000x9000"):
        imageio.inspect_image(png(9000, 9000, depth=16), max_pixels=LIMIT)
    with pytest.raises(BadRequest, match="dimensions"):
        imageio.inspect_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 8)


# ----------------------------------------------------------------------------- a worker refuses from the header


def test_the_default_pixel_limit_is_the_largest_float32_reply():
    config = WorkerConfig()
    assert max_pixels(config) == LIMIT == config.max_message_bytes // 4
    assert max_pixels(WorkerConfig(max_message_bytes=1 << 40)) == imageio.DEFAULT_MAX_PIXELS
    assert max_pixels(WorkerConfig(max_pixels=1000)) == 1000


def test_a_worker_refuses_from_the_header_before_decoding(broker, engine, start):
    """Requests whose header already dooms them are answered at once, and never decoded: the
    bytes after each header here are garbage, so a decode would fail with 'could not decode'."""
    start(make_config(broker.endpoint, max_batch=1), engine)
    identity, _, _ = broker.expect(protocol.READY)
    garbage = b"\0" * 64
    broker.request(identity, 1, image=png(3000, 2000, depth=16, body=garbage), op=protocol.OP_POINTCLOUD,
                   model="vits-hypersim", intrinsics=[1000.0, 1000.0, 1500.0, 1000.0])  # fmt: skip
    broker.request(identity, 2, image=png(600, 2, body=garbage), input_size=518)
    broker.request(identity, 3, image=png(4097, 4096, depth=16, body=garbage))
    broker.request(identity, 4, image=png(4096, 4096, body=garbage))  # within every limit: decoding is tried
    replies = broker.replies(4)
    assert replies[1][0]["status"] == "bad_request" and "points" in replies[1][1]["message"], replies[1]
    assert replies[2][0]["status"] == "bad_request" and "elongated" in replies[2][1]["message"], replies[2]
    assert replies[3][0]["status"] == "bad_request" and f"above the limit of {LIMIT}" in replies[3][1]["message"], replies[3]
    assert replies[4][0]["status"] == "bad_request" and "could not decode" in replies[4][1]["message"], replies[4]


def test_a_worker_counts_the_decode_peak_against_its_byte_bound(broker, engine, start):
    """A 16-bit PNG costs 12 bytes a pixel to decode: two of 1000x1000 do not fit in 20 MB (counted
    at 3 bytes a pixel, as before, they would), while one runs and a small JPEG still fits beside it."""
    gated = GatedEngine(engine)
    start(make_config(broker.endpoint, max_batch=1, max_held_bytes=20_000_000), gated)
    identity, _, _ = broker.expect(protocol.READY)
    wide = png(1000, 1000, depth=16)
    broker.request(identity, 1, image=wide)
    assert gated.started.wait(10)
    broker.request(identity, 2, image=wide)
    _, header, body = broker.expect(protocol.REPLY)
    assert header["rid"] == 2 and header["status"] == "overloaded", header
    assert "holds" in msgpack.unpackb(body[0])["message"]
    broker.request(identity, 3)  # a 64x48 JPEG
    gated.gate.set()
    replies = broker.replies(2)
    assert replies[1][0]["status"] == "ok" and replies[1][2]["depth"].shape == (1000, 1000)
    assert replies[3][0]["status"] == "ok"


# ----------------------------------------------------------------------------- the limit is served


@pytest.mark.timeout(240)
def test_an_image_at_the_pixel_limit_is_served_with_default_limits(tmp_path, weights_dir):
    """A real broker and worker, default limits: exactly the pixel limit comes back as a float32
    depth map of 64 MiB; one row more is refused, from the header."""
    from zdepth import Client
    from zdepth.errors import BadRequest as ClientBadRequest

    server = start_live_server(tmp_path, weights_dir, models=("vits",), max_batch=1)
    try:
        with Client(server.client_address, key=server.key, timeout=120, retries=0) as client:
            result = client.relative_depth(png(4096, 4096, colour=0), input_size=14)
            assert result.depth.shape == (4096, 4096) and result.depth.dtype == np.float32
            with pytest.raises(ClientBadRequest, match=f"above the limit of {LIMIT}"):
                client.relative_depth(png(4096, 4097, colour=0), input_size=14)
    finally:
        server.stop()
