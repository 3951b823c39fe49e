"""The whole system: real `zdepth broker` and `zdepth worker` processes, real sockets, zdepth.Client.

Small generated vits checkpoints, small images and input sizes, CPU only.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import cv2
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import zmq

from conftest import data_file
from procs import Proc, child_env, free_port, spawn, start_live_server, wait_for_health, zdepth_argv
from zdepth import BadRequest, Client, DeadlineExceeded, Unauthorized, UnknownModel
from zdepth.engine import Engine
from zdepth.pointcloud import Intrinsics, depth_to_points
from zdepth.protocol import VERSION, request_header
from zdepth.protocol.auth import apply_peer_security
from zdepth.protocol.codec import image_descriptor, params_frame

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

KEY = "test-key"
SIZE = 28  # network input size: tiny, so the CPU keeps up


@pytest.fixture(scope="module")
def image():
    return cv2.resize(cv2.imread(str(data_file("demo04.jpg"))), (80, 52), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def server(tmp_path_factory, weights_dir):
    live = start_live_server(tmp_path_factory.mktemp("serving"), weights_dir, models=("vits", "vits-hypersim"), key=KEY)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def engine(weights_dir):
    return Engine(device="cpu", weights_dir=weights_dir)


@pytest.fixture
def client(server):
    with Client(server.client_address, key=KEY, timeout=30, input_size=SIZE) as c:
        yield c


def raw_socket(address):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_peer_security(sock, key=KEY, curve=None)  # a keyed broker asks for the key at the handshake
    sock.connect(address)
    return sock


def raw_reply(sock, timeout=30.0):
    assert sock.poll(timeout * 1000), "no reply"
    frames = sock.recv_multipart()
    return msgpack.unpackb(frames[0]), frames[1:]


def served_count(client) -> int:
    return sum(w["served"] + w["failed"] for w in client.health()["workers"])


def test_every_op_end_to_end_matches_the_engine(client, engine, image):
    relative = client.relative_depth(image)
    expected = engine.infer([image], "vits", input_size=SIZE)[0]
    assert relative.depth.shape == image.shape[:2] and relative.depth.dtype == np.float32
    assert relative.depth.std() > 0, "a constant depth map would make every comparison here vacuous"
    np.testing.assert_allclose(relative.depth, expected, rtol=1e-5, atol=1e-6)
    assert relative.model == "vits" and relative.worker and relative.timings["round_trip_ms"] > 0
    assert relative.min == pytest.approx(float(expected.min()), rel=1e-5)

    metric = client.metric_depth(image, max_depth=7.5)
    np.testing.assert_allclose(metric.depth, engine.infer([image], "vits-hypersim", input_size=SIZE, max_depth=7.5)[0], rtol=1e-5, atol=1e-6)
    assert 0 <= metric.min <= metric.max <= 7.5

    legacy = client.legacy_relative_depth(image)
    np.testing.assert_allclose(legacy.depth * 7.5, metric.depth, rtol=1e-4, atol=1e-5)

    intrinsics = Intrinsics(fx=60.0, fy=61.0, cx=40.0, cy=26.0)
    cloud = client.pointcloud(image, intrinsics, max_depth=7.5)
    points, colors = depth_to_points(metric.depth, intrinsics, image)
    np.testing.assert_allclose(cloud.points, points, rtol=1e-4, atol=1e-5)
    assert cloud.points.shape == (image.shape[0] * image.shape[1], 3) and np.array_equal(cloud.colors, colors)
    on_server = client.pointcloud(image, intrinsics, max_depth=7.5, on_server=True)
    np.testing.assert_allclose(on_server.points, cloud.points, rtol=1e-5, atol=1e-6)

    health = client.health()
    assert health["models"] == ["vits", "vits-hypersim"] and health["workers"][0]["device"] == "cpu"


def test_encoded_inputs_and_float16_wire(server, image, tmp_path):
    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), image)
    with Client(server.client_address, key=KEY, timeout=30, input_size=SIZE) as client:
        from_array = client.relative_depth(image).depth
        from_file = client.relative_depth(path).depth
        from_bytes = client.relative_depth(path.read_bytes()).depth
    np.testing.assert_array_equal(from_array, from_file)
    np.testing.assert_array_equal(from_array, from_bytes)
    with Client(server.client_address, key=KEY, timeout=30, input_size=SIZE, depth_dtype="float16", wire_format="jpeg") as client:
        half = client.relative_depth(image).depth
    assert half.dtype == np.float32 and half.shape == image.shape[:2]
    assert np.linalg.norm(half - from_array) / np.linalg.norm(from_array) < 0.05  # JPEG + float16: close, not equal


def test_stream_returns_results_in_order(client, image):
    frames = [np.ascontiguousarray(np.roll(image, 7 * i, axis=1)) for i in range(6)]
    singles = [client.relative_depth(f).depth for f in frames]
    streamed = list(client.stream(frames, max_in_flight=3))
    assert [r.index for r in streamed] == list(range(6))
    for got, want in zip(streamed, singles):
        np.testing.assert_allclose(got.depth, want, rtol=1e-5, atol=1e-6)


def test_wrong_key_is_refused_and_no_worker_sees_it(server, client, image):
    before = served_count(client)
    with Client(server.client_address, key="not-the-key", timeout=10) as intruder:
        with pytest.raises(Unauthorized):
            intruder.relative_depth(image)
        with pytest.raises(Unauthorized):
            intruder.health()
    assert served_count(client) == before


def test_unknown_model_names_the_served_ones(client, image):
    started = time.monotonic()
    with pytest.raises(UnknownModel) as info:
        client.relative_depth(image, encoder="vitl")
    assert info.value.details["served"] == ["vits", "vits-hypersim"]
    assert time.monotonic() - started < 11  # at most the broker's reconnect grace, never the whole timeout


def _request(op="relative_depth", model="vits", params=None, payload=b"", key=KEY, timeout_ms=None):
    request_id = uuid.uuid4().hex[:12]
    return request_id, [request_header(id=request_id, key=key, op=op, model=model, timeout_ms=timeout_ms), params if params is not None else b"", payload]


def _bad_requests(image):
    raw = {"format": "raw", "dtype": "|u1", "shape": [52, 80, 3]}
    object_array = msgpack.packb({"image": np.array([{"a": 1}], dtype=object)}, default=msgpack_numpy.encode, use_bin_type=True)
    return {
        "garbage params": (params_frame(raw)[:-3] + b"\xc1\xc1\xc1", image.tobytes()),
        "params not a map": (msgpack.packb([1, 2]), image.tobytes()),
        "missing image field": (msgpack.packb({"input_size": SIZE}), image.tobytes()),
        "wrong type": (msgpack.packb({"image": raw, "input_size": "large"}), image.tobytes()),
        "input size not multiple of 14": (msgpack.packb({"image": raw, "input_size": 30}), image.tobytes()),
        "object dtype array": (object_array, image.tobytes()),
        "void dtype": (params_frame({"format": "raw", "dtype": "|V4", "shape": [52, 80]}), image.tobytes()[: 52 * 80 * 4]),
        "shape does not match bytes": (params_frame({"format": "raw", "dtype": "|u1", "shape": [52, 80, 3]}), b"\x00" * 10),
        "not an image": (params_frame({"format": "encoded"}), b"this is not a jpeg"),
        "zero size": (params_frame({"format": "raw", "dtype": "|u1", "shape": [0, 80, 3]}), b""),
        "absurd dimensions png": (params_frame({"format": "encoded"}), _png_header(100_000, 100_000)),
        "relative with max_depth": (params_frame({"format": "encoded"}, max_depth=5.0), cv2.imencode(".png", image)[1].tobytes()),
    }


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares an enormous size: a decompression bomb's header."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 64


def test_bad_requests_each_get_a_clear_error_and_service_continues(server, client, image):
    sock = raw_socket(server.client_address)
    try:
        cases = _bad_requests(image)
        ids = {}
        for name, (params, payload) in cases.items():
            request_id, frames = _request(params=params, payload=payload)
            ids[request_id] = name
            sock.send_multipart(frames)
        # A good request among them, sent as raw frames too.
        desc, array = image_descriptor(image)
        good_id, good = _request(params=params_frame(desc, input_size=SIZE), payload=array.tobytes())
        sock.send_multipart(good)
        replies = {}
        for _ in range(len(cases) + 1):
            header, frames = raw_reply(sock)
            assert header["id"] not in replies, "two replies to one request"
            replies[header["id"]] = (header, frames)
        for request_id, name in ids.items():
            header = replies[request_id][0]
            assert header["status"] == "bad_request", (name, header)
            assert len(header["message"]) > 10, name
        assert replies[good_id][0]["status"] == "ok"
        assert len(replies[good_id][1]) == 1
    finally:
        sock.close()
    assert client.relative_depth(image).depth.shape == image.shape[:2]


def test_garbage_frames_never_hurt_the_broker(server, client, image):
    sock = raw_socket(server.client_address)
    try:
        for frames in ([b""], [b"\x00" * 5000], [os.urandom(64), os.urandom(10)], [msgpack.packb({"v": VERSION, "id": "x", "key": KEY, "op": "relative_depth", "model": "vits"})]):
            sock.send_multipart(frames)
            header, _ = raw_reply(sock)
            assert header["status"] == "bad_request"
    finally:
        sock.close()
    assert client.relative_depth(image).depth.shape == image.shape[:2]


def test_deadline_expiry_is_answered_with_timeout(server, image):
    sock = raw_socket(server.client_address)
    try:
        desc, array = image_descriptor(np.zeros((480, 640, 3), np.uint8))
        request_id, frames = _request(params=params_frame(desc, input_size=518), payload=array.tobytes(), timeout_ms=1)
        sock.send_multipart(frames)
        header, _ = raw_reply(sock)
        assert (header["id"], header["status"]) == (request_id, "timeout")
    finally:
        sock.close()
    with Client(server.client_address, key=KEY, timeout=0.05, retries=0, input_size=518) as hasty:
        with pytest.raises(DeadlineExceeded):
            hasty.relative_depth(np.zeros((480, 640, 3), np.uint8))


def _start(tmp_path, name, *args, weights_dir=None):
    return spawn(zdepth_argv(*args, "--log-level", "debug"), tmp_path / f"{name}.log", child_env(weights_dir, ZDEPTH_KEY=KEY))


def _worker(tmp_path, name, worker_address, weights_dir, *extra):
    return _start(tmp_path, name, "worker", "--broker", worker_address, "--device", "cpu", "--model", "vits", "--warmup", "none", *extra, weights_dir=weights_dir)


def test_two_workers_share_load_and_kill_9_loses_nothing(tmp_path, weights_dir):
    clients, workers = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    procs: list[Proc] = [_start(tmp_path, "broker", "broker", "--clients", clients, "--workers", workers, "--heartbeat", "0.2")]
    try:
        procs += [_worker(tmp_path, f"worker{i}", workers, weights_dir, "--max-batch", "2", "--heartbeat", "0.2") for i in range(2)]
        wait_for_health(clients, key=KEY, workers=2, procs=procs)
        frame = np.zeros((240, 320, 3), np.uint8)  # input 266 on the CPU: slow enough to be caught in flight
        desc, array = image_descriptor(frame)
        sock = raw_socket(clients)
        sent = []
        for _ in range(12):
            request_id, frames = _request(params=params_frame(desc, input_size=266), payload=array.tobytes(), timeout_ms=120_000)
            sock.send_multipart(frames)
            sent.append(request_id)
        with Client(clients, key=KEY, timeout=10) as client:
            end = time.monotonic() + 30
            while True:
                busy = [w for w in client.health()["workers"] if w["in_flight"] > 0]
                if len(busy) == 2 or time.monotonic() > end:
                    break
                time.sleep(0.05)
            assert len(busy) == 2, "both workers should hold requests"
            victim = busy[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        replies: dict[str, str] = {}
        while len(replies) < len(sent):
            header, _ = raw_reply(sock, timeout=120)
            assert header["id"] not in replies, "a request was answered twice"
            replies[header["id"]] = header["status"]
        assert set(replies) == set(sent)
        assert set(replies.values()) == {"ok"}, replies
        assert not sock.poll(1000), "an extra reply arrived"
        sock.close()
    finally:
        for proc in reversed(procs):
            proc.stop(signal.SIGKILL)


def test_broker_restart_workers_reregister_and_client_recovers(tmp_path, weights_dir, image):
    clients, workers = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = _start(tmp_path, "broker1", "broker", "--clients", clients, "--workers", workers, "--heartbeat", "0.2")
    worker = _worker(tmp_path, "worker", workers, weights_dir, "--heartbeat", "0.2")
    try:
        wait_for_health(clients, key=KEY, procs=[broker, worker])
        with Client(clients, key=KEY, timeout=20, retries=3, input_size=SIZE) as client:
            first = client.relative_depth(image).depth
            broker.stop(signal.SIGKILL)
            broker = _start(tmp_path, "broker2", "broker", "--clients", clients, "--workers", workers, "--heartbeat", "0.2")
            again = client.relative_depth(image).depth
            np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-6)
            assert len(client.health()["workers"]) == 1
    finally:
        worker.stop(signal.SIGKILL)
        broker.stop(signal.SIGKILL)


def test_overload_is_refused_at_once(tmp_path, weights_dir):
    clients, workers = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    procs = [_start(tmp_path, "broker", "broker", "--clients", clients, "--workers", workers, "--max-queue", "2")]
    try:
        procs.append(_worker(tmp_path, "worker", workers, weights_dir, "--max-batch", "1", "--capacity", "1"))
        wait_for_health(clients, key=KEY, procs=procs)
        desc, array = image_descriptor(np.zeros((240, 320, 3), np.uint8))
        sock = raw_socket(clients)
        for _ in range(8):
            sock.send_multipart(_request(params=params_frame(desc, input_size=266), payload=array.tobytes())[1])
        statuses = [raw_reply(sock, timeout=120)[0]["status"] for _ in range(8)]
        assert statuses.count("overloaded") >= 4 and statuses.count("ok") >= 2, statuses
        with Client(clients, key=KEY, timeout=60) as client:
            assert client.health()["queue_limit"] == 2
        sock.close()
    finally:
        for proc in reversed(procs):
            proc.stop(signal.SIGKILL)


def test_float_image_is_a_bad_request(client):
    with pytest.raises(BadRequest):
        client.relative_depth(np.zeros((4, 4, 3), np.float64))
