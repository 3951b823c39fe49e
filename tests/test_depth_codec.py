"""``depth_codec="zstd"``: a reply's depth array as zstd (level 1) of its byte planes.

Unit tests of the layout and the round trip, of the bounded decompression (a
hostile frame must not make the reader allocate more than the array it
described), of the param's validation on both sides; and the whole system:
a real broker and CPU worker answer with the same depth, in fewer bytes.
"""

from __future__ import annotations

import sys
import tracemalloc
import uuid

import cv2
import msgpack
import numpy as np
import pytest
import zmq
import zstandard

from conftest import data_file
from zdepth import BadRequest, Client
from zdepth.protocol import OP_METRIC, OP_POINTCLOUD, OP_RELATIVE, compression, request_header
from zdepth.protocol.auth import apply_peer_security
from zdepth.protocol.codec import (
    DepthParams,
    array_frames,
    decode_arrays,
    image_descriptor,
    pack_body,
    params_frame,
    parse_params,
)

KEY = "test-key"
SIZE = 28
SHAPES = [(1,), (7,), (48, 64), (3, 5, 2), (0, 4), (2, 3, 4, 5)]


def frames_as_received(frames):
    """Frames as a client gets them from the socket: bytes-like, one per array."""
    return [memoryview(bytes(np.ascontiguousarray(f).data) if isinstance(f, np.ndarray) else f) for f in frames]


def smooth(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    return (np.linspace(1, 50, size) + rng.normal(0, 0.01, size)).astype(dtype).reshape(shape)


# ----------------------------------------------------------------------------- layout and round trip


def test_planes_are_byte_k_of_every_element_in_order():
    array = np.array([0x0102, 0x0304, 0x0506], dtype="<u2")
    assert compression.planes(array).tobytes() == bytes([0x02, 0x04, 0x06, 0x01, 0x03, 0x05])
    words = np.array([0x0A0B0C0D, 0x01020304], dtype="<u4")
    assert compression.planes(words).tobytes() == bytes([0x0D, 0x04, 0x0C, 0x03, 0x0B, 0x02, 0x0A, 0x01])
    frame = compression.compress(array)
    assert zstandard.ZstdDecompressor().decompress(frame) == bytes([0x02, 0x04, 0x06, 0x01, 0x03, 0x05])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_exact(dtype, shape):
    array = smooth(shape, dtype)
    if array.size:
        array.reshape(-1)[0] = np.nan  # NaN and infinities are bytes like any other
        array.reshape(-1)[-1] = -np.inf
    frame = compression.compress(array)
    out = compression.decompress(memoryview(frame), np.dtype(dtype), shape)
    assert out.dtype == dtype and out.shape == shape and out.flags.writeable
    assert out.tobytes() == array.tobytes()


def test_round_trip_of_a_non_contiguous_array_and_other_dtypes():
    array = smooth((40, 60), np.float32)[::2, 1::3]
    out = compression.decompress(compression.compress(array), array.dtype, array.shape)
    assert np.array_equal(out, array)
    for dtype in ("u1", "<i4", "<f8", "?"):
        array = (np.arange(30) % 7).astype(dtype).reshape(5, 6)
        assert np.array_equal(compression.decompress(compression.compress(array), array.dtype, array.shape), array)


def test_planes_make_smooth_float16_depth_smaller_than_plain_zstd():
    depth = smooth((120, 160), np.float16)
    frame = compression.compress(depth)
    assert len(frame) < len(zstandard.ZstdCompressor(level=1).compress(depth.tobytes())) < depth.nbytes


def test_array_frames_and_decode_arrays_carry_the_codec():
    depth, points = smooth((48, 64), np.float16), smooth((48 * 64, 3), np.float32)
    descs, frames = array_frames({"depth": depth, "points": points}, compressed=("depth",))
    assert descs == [
        {"name": "depth", "dtype": "<f2", "shape": [48, 64], "codec": "zstd"},
        {"name": "points", "dtype": "<f4", "shape": [48 * 64, 3]},
    ]
    assert len(frames[0]) < depth.nbytes
    arrays = decode_arrays(descs, frames_as_received(frames))
    assert np.array_equal(arrays["depth"], depth) and arrays["depth"].dtype == np.float16
    assert np.array_equal(arrays["points"], points)
    plain, _ = array_frames({"depth": depth})
    assert plain == [{"name": "depth", "dtype": "<f2", "shape": [48, 64]}]  # no codec asked: as before


# ----------------------------------------------------------------------------- bounded decompression

BIG = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def big_frames():
    """64 MiB of zeros as a few KiB of zstd: with its size in the frame header, and without."""
    zeros = bytes(BIG)
    return (
        zstandard.ZstdCompressor(level=1).compress(zeros),
        zstandard.ZstdCompressor(level=1, write_content_size=False).compress(zeros),
    )


def peak_bytes_of(call):
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_frame_stating_more_bytes_than_described_is_refused_before_any_allocation(big_frames):
    stated, _ = big_frames
    desc = [{"name": "depth", "dtype": "<f2", "shape": [48, 64], "codec": "zstd"}]

    def decode():
        with pytest.raises(BadRequest, match=f"states {BIG} bytes; it must hold exactly {48 * 64 * 2}"):
            decode_arrays(desc, [memoryview(stated)])

    assert peak_bytes_of(decode) < 1024 * 1024


def test_a_frame_without_its_size_is_bounded_by_the_described_size(big_frames):
    _, unstated = big_frames
    expected = 100 * 100 * 4

    def decode():
        with pytest.raises(BadRequest, match=f"does not decompress to {expected} bytes"):
            compression.decompress(unstated, np.dtype("<f4"), (100, 100))

    assert peak_bytes_of(decode) < expected + 1024 * 1024


def test_a_frame_of_fewer_bytes_than_described_is_refused():
    array = smooth((10, 10), np.float32)
    with pytest.raises(BadRequest, match="states 400 bytes; it must hold exactly 404"):
        compression.decompress(compression.compress(array), np.dtype("<f4"), (101,))
    unstated = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(compression.planes(array))
    with pytest.raises(BadRequest, match="decompresses to 400 bytes; it must hold exactly 404"):
        compression.decompress(unstated, np.dtype("<f4"), (101,))
    assert np.array_equal(compression.decompress(unstated, np.dtype("<f4"), (10, 10)), array)  # the right size is fine


def test_garbage_trailing_bytes_and_empty_frames_are_refused():
    array = smooth((4, 4), np.float16)
    frame = compression.compress(array)
    for bad in (b"", b"not zstd at all", frame + b"junk", frame[:-3]):
        with pytest.raises(BadRequest):
            compression.decompress(bad, np.dtype("<f2"), (4, 4))


def test_unknown_codecs_and_bad_descriptions_are_refused():
    depth = smooth((4, 4), np.float16)
    frame = compression.compress(depth)
    for codec_name in ("gzip", "none", "", None, 1, ["zstd"]):
        desc = [{"name": "depth", "dtype": "<f2", "shape": [4, 4], "codec": codec_name}]
        with pytest.raises(BadRequest, match="codec .* is unknown"):
            decode_arrays(desc, [memoryview(frame)])
    for desc in ({"name": "depth", "dtype": "|O", "shape": [4, 4], "codec": "zstd"}, {"name": "depth", "dtype": "<f2", "shape": "4x4", "codec": "zstd"}):
        with pytest.raises(BadRequest):
            decode_arrays([desc], [memoryview(frame)])


# ----------------------------------------------------------------------------- the request param


def test_parse_params_accepts_none_and_zstd_and_defaults_to_none():
    image = {"format": "encoded"}
    assert parse_params(OP_RELATIVE, params_frame(image)).depth_codec == "none"
    assert "depth_codec" not in msgpack.unpackb(params_frame(image))  # the default frame is unchanged
    for op in (OP_RELATIVE, OP_METRIC):
        assert parse_params(op, params_frame(image, depth_codec="zstd", depth_dtype="float16")).depth_codec == "zstd"
    assert parse_params(OP_POINTCLOUD, params_frame(image, intrinsics=[1, 1, 0, 0], depth_codec="zstd")).depth_codec == "zstd"
    assert parse_params(OP_RELATIVE, pack_body({"image": image, "depth_codec": "none"})).depth_codec == "none"


@pytest.mark.parametrize("bad", ["gzip", "ZSTD", "", None, 1, True, ["zstd"], {"a": 1}, b"zstd"])
def test_parse_params_refuses_other_codecs_naming_the_allowed_values(bad):
    with pytest.raises(BadRequest, match=r"'depth_codec' must be one of \['none', 'zstd'\]"):
        parse_params(OP_RELATIVE, pack_body({"image": {"format": "encoded"}, "depth_codec": bad}))


# ----------------------------------------------------------------------------- client and worker, in process


def test_the_client_checks_the_option_and_sends_it():
    for bad in ("gzip", None, 1, "float16"):
        with pytest.raises(ValueError, match="depth_codec must be one of"):
            Client("tcp://127.0.0.1:9", depth_codec=bad)
    image = np.zeros((8, 8, 3), np.uint8)
    with Client("tcp://127.0.0.1:9", depth_codec="zstd", depth_dtype="float16") as client:
        params = parse_params(OP_RELATIVE, client._build_relative(image).body[0])
        assert (params.depth_codec, params.depth_dtype) == ("zstd", "float16")
    with Client("tcp://127.0.0.1:9") as client:
        assert client.depth_codec == "none" and parse_params(OP_RELATIVE, client._build_relative(image).body[0]).depth_codec == "none"


def test_without_zstandard_a_client_fails_at_construction_and_a_worker_refuses(monkeypatch):
    from zdepth.worker.task import parse_request

    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "zdepth\[zstd\]"'):
        Client("tcp://127.0.0.1:9", depth_codec="zstd")
    Client("tcp://127.0.0.1:9").close()  # the default needs no zstandard

    desc, payload = image_descriptor(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    header = {"op": OP_RELATIVE, "model": "vits", "rid": 1, "id": "r"}

    def parse(**options):
        body = [zmq.Frame(params_frame(desc, **options)), zmq.Frame(payload)]
        return parse_request(header, body, models=("vits",), now=0.0, generation=0, max_image_bytes=1 << 20)

    with pytest.raises(BadRequest, match="zstandard package.*zdepth\\[zstd\\]"):
        parse(depth_codec="zstd")
    assert parse().params.depth_codec == "none"
    with pytest.raises(BadRequest, match="zstandard"):
        compression.compress(np.zeros(4, np.float16))


@pytest.mark.parametrize("op", [OP_RELATIVE, OP_POINTCLOUD])
def test_the_worker_compresses_only_the_depth_array(op):
    from zdepth.worker.messages import reply_frames
    from zdepth.worker.task import Task

    depth = smooth((48, 64), np.float32)
    params = DepthParams(image={"format": "encoded"}, intrinsics=(50.0, 50.0, 32.0, 24.0) if op == OP_POINTCLOUD else None,
                         depth_dtype="float16", depth_codec="zstd")  # fmt: skip
    task = Task(rid=1, request_id="r", op=op, model="vits", params=params, image=None, received=0.0, deadline=None, generation=0)
    frames = reply_frames(task, depth, worker="w", timings={}, batch=1)
    header = msgpack.unpackb(frames[1])
    assert header["arrays"][0] == {"name": "depth", "dtype": "<f2", "shape": [48, 64], "codec": "zstd"}
    assert all("codec" not in desc for desc in header["arrays"][1:])  # points travel as they are
    assert len(frames[2]) < depth.size * 2
    arrays = decode_arrays(header["arrays"], frames_as_received(frames[2:]))
    assert np.array_equal(arrays["depth"], depth.astype(np.float16))
    assert (header["min"], header["max"]) == (float(depth.min()), float(depth.max()))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def server(tmp_path_factory, weights_dir):
    from procs import start_live_server

    live = start_live_server(tmp_path_factory.mktemp("depth_codec"), weights_dir, models=("vits",), key=KEY)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def image():
    return cv2.resize(cv2.imread(str(data_file("demo04.jpg"))), (64, 48), interpolation=cv2.INTER_AREA)


def raw_request(address, image, **options):
    """One relative_depth request on a raw DEALER: (reply header, reply frames after it)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_peer_security(sock, key=KEY, curve=None)
    sock.connect(address)
    try:
        desc, array = image_descriptor(image)
        request_id = uuid.uuid4().hex[:12]
        header = request_header(id=request_id, key=KEY, op=OP_RELATIVE, model="vits")
        sock.send_multipart([header, params_frame(desc, input_size=SIZE, **options), array.tobytes()])
        assert sock.poll(60_000), "no reply"
        reply = sock.recv_multipart()
    finally:
        sock.close()
    header = msgpack.unpackb(reply[0])
    assert (header["id"], header["status"]) == (request_id, "ok"), header
    return header, reply[1:]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_live_worker_answers_the_same_depth_in_fewer_bytes(server, image):
    with Client(server.client_address, key=KEY, timeout=60, input_size=SIZE, depth_dtype="float16") as client:
        plain = client.relative_depth(image)
    with Client(server.client_address, key=KEY, timeout=60, input_size=SIZE, depth_dtype="float16", depth_codec="zstd") as client:
        packed = client.relative_depth(image)
    assert packed.depth.dtype == np.float32 and packed.depth.shape == image.shape[:2]
    assert packed.depth.std() > 0, "a constant depth map would make the comparison vacuous"
    np.testing.assert_array_equal(packed.depth, plain.depth)
    assert (packed.min, packed.max) == (plain.min, plain.max)

    raw_header, raw_frames = raw_request(server.client_address, image, depth_dtype="float16")
    zstd_header, zstd_frames = raw_request(server.client_address, image, depth_dtype="float16", depth_codec="zstd")
    assert raw_header["arrays"] == [{"name": "depth", "dtype": "<f2", "shape": [48, 64]}]
    assert zstd_header["arrays"] == [{"name": "depth", "dtype": "<f2", "shape": [48, 64], "codec": "zstd"}]
    assert len(raw_frames[0]) == 48 * 64 * 2
    assert len(zstd_frames[0]) < len(raw_frames[0])
    decoded = compression.decompress(zstd_frames[0], np.dtype("<f2"), (48, 64))
    assert decoded.tobytes() == raw_frames[0]
