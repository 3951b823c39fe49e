"""The blocking Client against a fake server: a raw ROUTER on a loopback port that answers per protocol.

The fake is a test double of the broker at the socket level. It parses what the
client sends with the server's own parsers (protocol.parse_request_header,
codec.parse_params), so these tests also pin the frames against the contract.
test_aio.py imports it from here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np
import pytest
import zmq

import zdepth
from zdepth import protocol
from zdepth.client import Client, ClientState
from zdepth.client.results import DepthResult, PointCloudResult
from zdepth.errors import ERRORS_BY_CODE, BadRequest, BrokerUnreachable, ConfigError, DeadlineExceeded, InternalError, Overloaded, Unauthorized
from zdepth.pointcloud import Intrinsics, depth_to_points
from zdepth.protocol import codec
from zdepth.protocol.curve import CurveClient, CurveServer, apply_server, generate
from zdepth.protocol.images import decode_image

pytestmark = pytest.mark.timeout(30)

INTRINSICS = Intrinsics(fx=50.0, fy=55.0, cx=15.5, cy=11.5)


# ----------------------------------------------------------------------------- the fake server


@dataclass
class Received:
    """One request as the fake server saw it."""

    identity: bytes
    header: dict[str, Any]  # the raw header map
    params: codec.DepthParams | None
    image: Any  # bytes (encoded) or an array (raw), or None for health
    frames: list[bytes] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.header["id"]


Handler = Callable[["FakeServer", Received], "list[tuple[Received, list[bytes]]] | None"]


class FakeServer:
    """A ROUTER in a thread. ``handler(server, received)`` returns (request, reply frames) pairs to send now.

    The default handler answers every request at once: a depth map made by
    ``fake_depth`` (points too for op pointcloud; a health map for health).
    """

    def __init__(self, handler: Handler | None = None, curve: CurveServer | None = None) -> None:
        self.handler = handler or (lambda server, rec: [(rec, answer(rec))])
        self.requests: list[Received] = []
        self.errors: list[Exception] = []
        self.outstanding = 0
        self.max_outstanding = 0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            apply_server(self._socket, curve)
        port = self._socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(20):
                continue
            identity, *frames = self._socket.recv_multipart()
            header = protocol.unpack_map(frames[0], what="header")
            parsed = protocol.parse_request_header(frames[0])
            params = image = None
            if parsed.op in protocol.MODEL_OPS:
                params = codec.parse_params(parsed.op, frames[1])
                image = codec.decode_image_frame(params.image, frames[2])
            rec = Received(identity, header, params, image, frames)
            self.requests.append(rec)
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)
            try:
                replies = self.handler(self, rec) or []
            except Exception as exc:  # reported at teardown; the client sees no reply
                self.errors.append(exc)
                continue
            for target, reply in replies:
                self.outstanding -= 1
                self._socket.send_multipart([target.identity, *reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close(linger=0)
        self._context.term()
        if self.errors:
            raise AssertionError(f"the fake server's handler failed: {self.errors!r}")


@pytest.fixture
def serve():
    """serve(handler=None) -> a running FakeServer, closed after the test."""
    servers: list[FakeServer] = []

    def start(handler: Handler | None = None, curve: CurveServer | None = None) -> FakeServer:
        servers.append(FakeServer(handler, curve))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def pixels(rec: Received) -> np.ndarray:
    return decode_image(rec.image if isinstance(rec.image, np.ndarray) else bytes(rec.image))


def fake_depth(image: np.ndarray) -> np.ndarray:
    """A deterministic 'depth map' of an image: positive, varies by pixel and by image."""
    height, width = image.shape[:2]
    ramp = (np.arange(height * width, dtype=np.float32).reshape(height, width) % 97) / 10.0
    return ramp + 1.0 + image[..., 0].astype(np.float32) / 255.0


def depth_reply(rec: Received, depth: np.ndarray, *, with_minmax: bool = True, **extra: Any) -> list[bytes]:
    dtype = rec.params.depth_dtype if rec.params else "float32"
    arrays = {"depth": depth.astype(codec.DEPTH_DTYPES[dtype])}
    arrays.update(extra.pop("arrays", {}))
    descs, buffers = codec.array_frames(arrays)
    fields: dict[str, Any] = {
        "arrays": descs,
        "model": rec.header.get("model", "picked"),
        "worker": "fake-0",
        "timings": {"infer_ms": 1.5},
    }
    if with_minmax:
        fields.update(min=float(depth.min()), max=float(depth.max()))
    fields.update(extra)
    return [protocol.reply_header(rec.id, **fields), *(b.tobytes() for b in buffers)]


def answer(rec: Received) -> list[bytes]:
    """The default reply: health map, depth map, or points and depth for op pointcloud."""
    op = rec.header["op"]
    if op == protocol.OP_HEALTH:
        return [protocol.reply_header(rec.id, health={"status": "ok", "workers": 1, "models": ["vits"]})]
    depth = fake_depth(pixels(rec))
    if op == protocol.OP_POINTCLOUD:
        points, _ = depth_to_points(depth, Intrinsics(*rec.params.intrinsics))
        return depth_reply(rec, depth, arrays={"points": points})
    return depth_reply(rec, depth)


def error_reply(rec: Received, code: str, message: str = "boom", details: dict | None = None) -> list[bytes]:
    return [protocol.error_header(rec.id, code, message, details)]


def frame(seed: int = 0, height: int = 24, width: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- frames as sent


def test_relative_depth_sends_raw_frame_and_decodes_result(serve):
    server = serve()
    image = frame(1)
    with Client(server.address, key="s3cret", input_size=518) as client:
        result = client.relative_depth(image)
    rec = server.requests[0]
    assert rec.header["v"] == protocol.VERSION
    assert rec.header["op"] == "relative_depth" and rec.header["model"] == "vits"
    assert rec.header["key"] == "s3cret"
    assert len(rec.id) == 16 and int(rec.id, 16) >= 0
    assert 0 < rec.header["timeout_ms"] <= 30_000
    assert rec.params.image == {"format": "raw", "dtype": "|u1", "shape": [24, 32, 3]}
    assert rec.params.input_size == 518 and rec.params.max_depth is None and rec.params.depth_dtype == "float32"
    assert rec.frames[2] == image.tobytes()
    assert isinstance(result, DepthResult)
    expected = fake_depth(image)
    np.testing.assert_array_equal(result.depth, expected)
    assert result.depth.dtype == np.float32 and result.depth.flags.writeable
    assert result.min == pytest.approx(expected.min()) and result.max == pytest.approx(expected.max())
    assert (result.model, result.worker, result.index) == ("vits", "fake-0", None)
    assert result.timings["infer_ms"] == 1.5 and result.timings["round_trip_ms"] > 0


def test_metric_model_ids_and_call_overrides(serve):
    server = serve()
    image = frame()
    with Client(server.address, encoder="vitl", dataset="vkitti", max_depth=30.0, timeout=5) as client:
        client.metric_depth(image)
        client.metric_depth(image, encoder="vitb", dataset="hypersim", max_depth=5.0, input_size=280)
        client.relative_depth(image)
    first, second, third = server.requests
    assert (first.header["op"], first.header["model"], first.params.max_depth) == ("metric_depth", "vitl-vkitti", 30.0)
    assert (second.header["model"], second.params.max_depth, second.params.input_size) == ("vitb-hypersim", 5.0, 280)
    assert third.header["model"] == "vitl" and third.params.max_depth is None
    assert first.header["timeout_ms"] <= 5000


def test_no_encoder_anywhere_sends_no_model(serve):
    server = serve()
    with Client(server.address, encoder=None) as client:
        client.metric_depth(frame())
        client.relative_depth(frame(), encoder="vitb")
    assert "model" not in server.requests[0].header
    assert server.requests[1].header["model"] == "vitb"


def test_jpeg_wire_format_encodes_arrays(serve):
    server = serve()
    image = np.full((24, 32, 3), 120, dtype=np.uint8)
    with Client(server.address, wire_format="jpeg") as client:
        client.relative_depth(image)
    rec = server.requests[0]
    assert rec.params.image == {"format": "encoded"}
    assert bytes(rec.image[:3]) == b"\xff\xd8\xff"
    assert np.abs(decode_image(bytes(rec.image)).astype(int) - 120).max() <= 2


def test_encoded_bytes_and_paths_are_sent_as_they_are(serve, tmp_path):
    server = serve()
    image = frame(2)
    png = cv2.imencode(".png", image)[1].tobytes()
    path = tmp_path / "frame.png"
    path.write_bytes(png)
    with Client(server.address, wire_format="jpeg") as client:  # jpeg only re-encodes arrays
        results = [client.relative_depth(source) for source in (png, bytearray(png), str(path), path)]
    for rec in server.requests:
        assert rec.params.image == {"format": "encoded"} and bytes(rec.image) == png
    for result in results:
        np.testing.assert_array_equal(result.depth, fake_depth(image))


def test_bad_image_type_raises_before_sending(serve):
    server = serve()
    with Client(server.address) as client:
        with pytest.raises(TypeError, match="numpy array"):
            client.relative_depth(12345)
        with pytest.raises(FileNotFoundError):
            client.relative_depth("/no/such/image.jpg")
    assert server.requests == []


def test_float16_on_the_wire_becomes_float32(serve):
    server = serve(lambda s, rec: [(rec, depth_reply(rec, fake_depth(pixels(rec)), with_minmax=False))])
    image = frame(3)
    with Client(server.address, depth_dtype="float16") as client:
        result = client.metric_depth(image)
    assert server.requests[0].params.depth_dtype == "float16"
    expected = fake_depth(image).astype(np.float16).astype(np.float32)
    assert result.depth.dtype == np.float32
    np.testing.assert_array_equal(result.depth, expected)
    assert (result.min, result.max) == (float(expected.min()), float(expected.max()))  # computed here


def test_health_is_a_bare_header(serve):
    server = serve()
    with Client(server.address, key="k") as client:
        health = client.health()
    assert health == {"status": "ok", "workers": 1, "models": ["vits"]}
    rec = server.requests[0]
    assert rec.header["op"] == "health" and "model" not in rec.header and len(rec.frames) == 1


def test_wait_ready_returns_the_health_once_a_worker_serves_the_model(serve):
    answers = iter([{"status": "ok", "workers": [], "models": []}] * 2)
    ready = {"status": "ok", "models": ["vits"], "workers": [{"models": ["vits"], "state": "ready"}, {"models": ["vits"], "state": "draining"}]}

    def handler(server, rec):
        return [(rec, [protocol.reply_header(rec.id, health=next(answers, ready))])]

    server = serve(handler)
    with Client(server.address) as client:
        assert client.wait_ready(timeout=10, model="vits") == ready
        with pytest.raises(DeadlineExceeded, match=r"no 2 worker\(s\) ready for vits at .* the broker answers, with 1 ready"):
            client.wait_ready(timeout=0.3, model="vits", workers=2)
        with pytest.raises(DeadlineExceeded, match="ready for vitl-hypersim"):
            client.wait_ready(timeout=0.2, model="vitl-hypersim")
    assert len(server.requests) >= 4  # asked again until the worker showed up, and while it waited in vain


def test_wait_ready_without_a_broker_raises_broker_unreachable():
    from procs import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with Client(address, timeout=5) as client:
        with pytest.raises(BrokerUnreachable, match=f"no 1 worker\\(s\\) ready for any model: cannot reach the broker at {address}"):
            client.wait_ready(timeout=0.5)
    assert time.monotonic() - started < 3.0


def test_legacy_relative_depth_is_metric_with_max_depth_one(serve):
    server = serve()
    with Client(server.address) as client:
        client.legacy_relative_depth(frame(), encoder="vitl")
    rec = server.requests[0]
    assert (rec.header["op"], rec.header["model"], rec.params.max_depth) == ("metric_depth", "vitl-hypersim", 1.0)


# ----------------------------------------------------------------------------- keys and errors


def test_key_from_environment(serve, monkeypatch, tmp_path):
    server = serve()
    monkeypatch.setenv("ZDEPTH_KEY", "from-env")
    with Client(server.address) as client:
        client.health()
    monkeypatch.delenv("ZDEPTH_KEY")
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("ZDEPTH_KEY_FILE", str(key_file))
    with Client(server.address) as client:
        client.health()
    with Client(server.address, key="explicit") as client:
        client.health()
    assert [rec.header["key"] for rec in server.requests] == ["from-env", "from-file", "explicit"]


@pytest.mark.parametrize("code", protocol.ERROR_CODES)
def test_error_reply_raises_typed_exception(serve, code):
    server = serve(lambda s, rec: [(rec, error_reply(rec, code, "what went wrong", {"model": "vitl"}))])
    with Client(server.address, retries=0) as client:
        with pytest.raises(ERRORS_BY_CODE[code]) as info:
            client.relative_depth(frame())
    assert info.value.code == code and info.value.message == "what went wrong"
    assert info.value.details == {"model": "vitl"}
    assert len(server.requests) == 1  # error replies are never retried


def test_unknown_error_code_and_malformed_reply_are_internal(serve):
    replies = iter(
        [
            lambda rec: [protocol.pack({"v": 1, "id": rec.id, "status": "melted", "message": "hot"})],
            lambda rec: [protocol.reply_header(rec.id, arrays=[{"name": "depth", "dtype": "<f4", "shape": [2, 2]}]), b"123"],
        ]
    )
    server = serve(lambda s, rec: [(rec, next(replies)(rec))])
    with Client(server.address) as client:
        with pytest.raises(InternalError, match=r"\[melted\] hot"):
            client.relative_depth(frame())
        with pytest.raises(InternalError, match="could not decode"):
            client.relative_depth(frame())


def test_stale_and_unknown_replies_are_dropped(serve):
    def handler(server, rec):
        stale = protocol.reply_header("0123456789abcdef", health={"stale": True})
        garbage = b"\xc1 not msgpack"
        return [(rec, [stale]), (rec, [garbage]), (rec, answer(rec))]

    server = serve(handler)
    with Client(server.address) as client:
        assert client.health()["status"] == "ok"


# ----------------------------------------------------------------------------- timeouts and retries


def test_lost_reply_is_resent_with_a_new_id(serve):
    server = serve(lambda s, rec: None if len(s.requests) == 1 else [(rec, answer(rec))])
    image = frame(4)
    start = time.monotonic()
    with Client(server.address, timeout=0.3, retries=1) as client:
        result = client.relative_depth(image)
    assert time.monotonic() - start >= 0.3
    np.testing.assert_array_equal(result.depth, fake_depth(image))
    first, second = server.requests
    assert first.id != second.id  # a reply says which attempt it answers
    assert first.identity == second.identity  # the same connection: a late reply to the first still arrives
    assert 290 <= second.header["timeout_ms"] <= 300


def test_no_reply_raises_deadline_exceeded_in_bounded_time(serve):
    server = serve(lambda s, rec: None)
    start = time.monotonic()
    with Client(server.address, timeout=0.2, retries=2) as client:
        with pytest.raises(DeadlineExceeded) as info:
            client.relative_depth(frame())
        elapsed = time.monotonic() - start
        assert 0.6 <= elapsed < 3.0
        assert server.address in str(info.value) and "3 attempt" in str(info.value)
        assert len(server.requests) == 3 and len({r.id for r in server.requests}) == 3
        assert isinstance(info.value, TimeoutError)
        # The client stays usable after a timeout.
        server.handler = lambda s, rec: [(rec, answer(rec))]
        assert client.health()["status"] == "ok"


def test_no_broker_listening_does_not_hang():
    with zmq.Context.instance().socket(zmq.ROUTER) as probe:  # a free port, then nothing there
        port = probe.bind_to_random_port("tcp://127.0.0.1")
    start = time.monotonic()
    with Client(f"tcp://127.0.0.1:{port}", timeout=0.2, retries=1) as client:
        with pytest.raises(DeadlineExceeded, match=f"127.0.0.1:{port}"):
            client.relative_depth(frame())
    assert time.monotonic() - start < 2.0


def test_curve_encrypted_broker(serve, tmp_path):
    server_public, server_secret = generate(tmp_path, "broker")
    _, client_secret = generate(tmp_path, "robot")
    server = serve(curve=CurveServer(server_secret))  # no allow-list: any client knowing the broker's key
    with Client(server.address, curve=CurveClient(client_secret, server_public), timeout=5) as client:
        assert client.health()["status"] == "ok"
    with Client(server.address, timeout=5, retries=0) as plain:  # the handshake fails, and says why
        start = time.monotonic()
        with pytest.raises(Unauthorized, match="CurveZMQ"):
            plain.health()
        assert time.monotonic() - start < 3.0
    with pytest.raises(ConfigError, match="secret"):
        Client(server.address, curve=CurveClient(server_public, server_public)).open()


# ----------------------------------------------------------------------------- point clouds


@pytest.mark.parametrize(
    "intrinsics",
    [
        INTRINSICS,
        {"fx": 50.0, "fy": 55.0, "cx": 15.5, "cy": 11.5},
        (50, 55, 15.5, 11.5),
        np.array([50.0, 55.0, 15.5, 11.5]),
        [[50.0, 0.0, 15.5], [0.0, 55.0, 11.5], [0.0, 0.0, 1.0]],
    ],
    ids=["Intrinsics", "dict", "tuple", "array", "matrix"],
)
def test_pointcloud_on_client_matches_depth_to_points(serve, intrinsics):
    server = serve()
    image = frame(5)
    with Client(server.address) as client:
        result = client.pointcloud(image, intrinsics, max_depth=10.0)
    rec = server.requests[0]
    assert rec.header["op"] == "metric_depth" and rec.params.intrinsics is None and rec.params.max_depth == 10.0
    assert isinstance(result, PointCloudResult)
    depth = fake_depth(image)
    points, rgb = depth_to_points(depth, INTRINSICS, colors=image)
    np.testing.assert_array_equal(result.points, points)
    np.testing.assert_array_equal(result.colors, rgb)
    np.testing.assert_array_equal(result.colors[0], image[0, 0, ::-1])
    np.testing.assert_array_equal(result.depth.depth, depth)


def test_pointcloud_colors_from_encoded_image_and_off(serve):
    server = serve()
    image = frame(6)
    png = cv2.imencode(".png", image)[1].tobytes()
    with Client(server.address) as client:
        with_colors = client.pointcloud(png, INTRINSICS)
        without = client.pointcloud(image, INTRINSICS, colors=False)
    np.testing.assert_array_equal(with_colors.colors, image[..., ::-1].reshape(-1, 3))
    assert without.colors is None and without.points.shape == (24 * 32, 3)


def test_pointcloud_on_server(serve, tmp_path):
    server = serve()
    image = frame(7)
    with Client(server.address) as client:
        result = client.pointcloud(image, INTRINSICS.as_matrix(), on_server=True, encoder="vitb")
    rec = server.requests[0]
    assert (rec.header["op"], rec.header["model"]) == ("pointcloud", "vitb-hypersim")
    assert rec.params.intrinsics == (50.0, 55.0, 15.5, 11.5)
    points, rgb = depth_to_points(fake_depth(image), INTRINSICS, colors=image)
    np.testing.assert_array_equal(result.points, points)
    np.testing.assert_array_equal(result.colors, rgb)
    np.testing.assert_array_equal(result.depth.depth, fake_depth(image))
    result.save_ply(tmp_path / "cloud.ply")
    assert (tmp_path / "cloud.ply").stat().st_size > len(points) * 15


def test_pointcloud_on_server_without_depth_array(serve):
    def handler(server, rec):
        depth = fake_depth(pixels(rec))
        points, _ = depth_to_points(depth, Intrinsics(*rec.params.intrinsics))
        descs, buffers = codec.array_frames({"points": points})
        return [(rec, [protocol.reply_header(rec.id, arrays=descs, model="vits-hypersim"), buffers[0].tobytes()])]

    server = serve(handler)
    image = frame(8)
    with Client(server.address) as client:
        result = client.pointcloud(image, INTRINSICS, on_server=True, colors=False)
    np.testing.assert_allclose(result.depth.depth, fake_depth(image), rtol=1e-6)
    assert result.colors is None


def test_bad_intrinsics_raise_before_sending(serve):
    server = serve()
    with Client(server.address) as client:
        for bad in ({"fx": 1.0}, (1, 2, 3), [[1, 2], [3, 4]], (0, 1, 2, 3)):
            with pytest.raises(BadRequest):
                client.pointcloud(frame(), bad)
    assert server.requests == []


# ----------------------------------------------------------------------------- streams


def reverse_batches(size: int) -> Handler:
    """Hold requests until ``size`` are waiting, then answer them newest first."""
    held: list[Received] = []

    def handler(server, rec):
        held.append(rec)
        if len(held) < size:
            return None
        batch = [(r, answer(r)) for r in reversed(held)]
        held.clear()
        return batch

    return handler


def test_stream_yields_in_order_with_replies_out_of_order(serve):
    server = serve(reverse_batches(4))
    frames = [frame(i) for i in range(8)]
    with Client(server.address, timeout=5) as client:
        results = list(client.stream(frames, max_in_flight=4))
    assert [r.index for r in results] == list(range(8))
    for image, result in zip(frames, results):
        np.testing.assert_array_equal(result.depth, fake_depth(image))
    assert server.max_outstanding == 4
    assert len({rec.identity for rec in server.requests}) == 1  # one socket


def test_stream_reads_frames_lazily(serve):
    server = serve()
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield frame(i)

    with Client(server.address) as client:
        stream = client.stream(source(), op="metric_depth", max_in_flight=2, dataset="vkitti")
        first = next(stream)
        assert first.index == 0 and len(pulled) <= 3
        rest = list(stream)
    assert [r.index for r in rest] == [1, 2, 3, 4]
    assert {rec.header["model"] for rec in server.requests} == {"vits-vkitti"}


def test_stream_latest_only_sends_the_newest_frame(serve):
    first_received, produced = threading.Event(), threading.Event()

    def handler(server, rec):
        if len(server.requests) == 1:
            first_received.set()
            assert produced.wait(5)  # hold frame 0 until the source has moved on to frame 3
        return [(rec, answer(rec))]

    def source():
        yield frame(0)
        assert first_received.wait(5)
        for i in (1, 2, 3):
            yield frame(i)
        produced.set()

    server = serve(handler)
    with Client(server.address, timeout=5) as client:
        results = list(client.stream(source(), max_in_flight=1, latest_only=True))
    assert [r.index for r in results] == [0, 3]  # frames 1 and 2 went stale while 0 was out
    sent = [rec.frames[2] for rec in server.requests]
    assert sent == [frame(0).tobytes(), frame(3).tobytes()]


def test_stream_latest_only_keeps_up_when_the_server_does(serve):
    server = serve()
    gate = threading.Semaphore(0)

    def source():  # a "camera" that produces a frame only after the previous result came back
        for i in range(5):
            yield frame(i)
            gate.acquire(timeout=5)

    with Client(server.address) as client:
        indices = []
        for result in client.stream(source(), latest_only=True, max_in_flight=2):
            indices.append(result.index)
            gate.release()
    assert indices == [0, 1, 2, 3, 4]


def test_stream_failure_raises_or_is_yielded(serve):
    def handler(server, rec):
        if rec.frames[2:] == [frame(1).tobytes()]:
            return [(rec, error_reply(rec, "overloaded", "queue full"))]
        return [(rec, answer(rec))]

    server = serve(handler)
    frames = [frame(i) for i in range(4)]
    with Client(server.address) as client:
        got = []
        with pytest.raises(Overloaded, match="queue full"):
            for result in client.stream(frames, max_in_flight=2):
                got.append(result.index)
        assert got == [0]
        results = list(client.stream(frames, max_in_flight=2, return_exceptions=True))
        assert isinstance(results[1], Overloaded)
        assert [r.index for r in results if isinstance(r, DepthResult)] == [0, 2, 3]
        assert client.health()["status"] == "ok"  # abandoned stream replies were dropped


def test_stream_source_error_propagates(serve):
    server = serve()

    def source():
        yield frame(0)
        raise OSError("camera unplugged")

    with Client(server.address) as client:
        for latest_only in (False, True):
            with pytest.raises(OSError, match="camera unplugged"):
                list(client.stream(source(), latest_only=latest_only))


def test_stream_lost_reply_is_resent(serve):
    server = serve(lambda s, rec: None if len(s.requests) == 2 else [(rec, answer(rec))])
    with Client(server.address, timeout=0.3, retries=1) as client:
        results = list(client.stream([frame(i) for i in range(3)], max_in_flight=3))
    assert [r.index for r in results] == [0, 1, 2]


def test_stream_of_point_clouds(serve):
    server = serve()
    frames = [frame(i) for i in range(3)]
    with Client(server.address) as client:
        results = list(client.stream(frames, op="pointcloud", intrinsics=(50, 55, 15.5, 11.5), colors=False))
    assert [r.index for r in results] == [0, 1, 2]
    points, _ = depth_to_points(fake_depth(frames[2]), INTRINSICS)
    np.testing.assert_array_equal(results[2].points, points)


def test_stream_validates_arguments_up_front(serve):
    with Client("tcp://127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="stream op"):
            client.stream([], op="health")
        with pytest.raises(TypeError, match="max_depth"):
            client.stream([], op="relative_depth", max_depth=3)
        with pytest.raises(ValueError, match="max_in_flight"):
            client.stream([], max_in_flight=0)
        with pytest.raises(TypeError, match="intrinsics"):
            client.stream([], op="pointcloud")


# ----------------------------------------------------------------------------- lifecycle and packaging


def test_lifecycle_states_and_closed_client(serve):
    server = serve()
    client = Client(server.address)
    assert client.state is ClientState.UNOPENED
    client.health()
    assert client.state is ClientState.OPENED
    client.close()
    client.close()
    assert client.state is ClientState.CLOSED and client.closed
    with pytest.raises(RuntimeError, match="closed"):
        client.health()
    with pytest.raises(RuntimeError, match="closed"):
        client.open()
    assert "s3cret" not in repr(Client(server.address, key="s3cret"))


def test_constructor_validates_options():
    for kwargs in ({"timeout": 0}, {"timeout": None}, {"retries": -1}, {"depth_dtype": "float64"}, {"wire_format": "png"}):
        with pytest.raises(ValueError):
            Client(**kwargs)
    for address in ("tcp://127.0.0.1", "tcp//host:5555", "http://gpu-box:5555", "gpu-box:99999"):
        with pytest.raises(ConfigError, match="accepted forms|ZeroMQ, not HTTP|1 to 65535"):
            Client(address)


def test_from_profile_reads_the_profile_file(monkeypatch, tmp_path):
    (tmp_path / "lab.key").write_text("pk\n")
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[lab]\naddress = "lab-box:5555"\nkey_file = "lab.key"\nmodel = "vitl-vkitti"\n')
    monkeypatch.setenv("ZDEPTH_CONFIG", str(profiles))
    client = Client.from_profile("lab", timeout=3.0)
    assert (client.address, client.encoder, client.dataset, client.timeout) == ("tcp://lab-box:5555", "vitl", "vkitti", 3.0)
    assert client._pipeline.key == "pk"


def test_package_exports():
    assert {"Client", "AsyncClient", "DepthResult", "PointCloudResult"} <= set(zdepth.__all__)
