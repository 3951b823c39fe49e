"""Bad input: the short fuzz run, and the limits that keep bad input from hurting the broker or a worker.

``test_fuzz_short`` runs ``benchmarks/fuzz.py`` (a real broker and worker,
random and mutated messages at both ports, good and bad ``depth_codec``
values among them) in a 3,000-message version with the same checks as the
long run. The other tests pin each limit, in-process: the broker with a
real Worker whose engine is a stub, so no model runs:

- message size: a frame over MAXMSGSIZE drops that connection, the broker serves on;
- image pixels: a decompression bomb hidden behind a stray byte is refused unallocated;
- bytes held: the broker's queue (``max_queue_bytes``) and a worker's images
  (``max_held_bytes``) are bounded, with ``overloaded`` past the bound;
- reply size: a depth map or point cloud over the message limit is refused before inference;
- network input: an absurdly elongated image is refused before inference;
- input that crashed a parser (found by the fuzzer) gets ``bad_request``;
- every socket sets MAXMSGSIZE and high-water marks.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from zdepth.broker import Broker
from zdepth.config import BrokerConfig, Heartbeat, WorkerConfig
from zdepth.errors import BadRequest
from zdepth.protocol import VERSION, command, pack, request_header
from zdepth.protocol import images as imageio
from zdepth.protocol.auth import apply_peer_security
from zdepth.protocol.codec import image_descriptor, params_frame
from zdepth.worker import Worker

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
KEY = "limits-key"
HEARTBEAT = Heartbeat(interval_s=0.1, liveness=5)
IMAGE = np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- the short fuzz run


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_fuzz_short(tmp_path, weights_dir):
    out = tmp_path / "fuzz.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--frames", "3000", "--deep-warmup", "30", "--oversize", "1", "--seed", "7"]
    argv += ["--weights-dir", str(weights_dir), "--logs", str(tmp_path / "logs"), "--json", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    assert out.exists(), f"no result:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    failed = [name for name, passed in result["checks"].items() if not passed]
    assert proc.returncode == 0 and not failed, f"failed checks {failed}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert result["frames_total"] >= 3000 and result["frames"]["client port"] > result["frames"]["worker port"] > 300
    assert result["unanswered"] == 0 and result["duplicates"] == 0
    assert result["oversize"] == {"client port": [True], "worker port": [True]}
    replies = result["replies_client_port"]
    assert replies["bad_request"] > 1000 and replies["unauthorized"] > 100 and replies["ok (depth)"] > 0
    # depth_codec: "zstd" came back compressed and decoded, each bad value (unknown name, wrong type) as one bad_request naming it
    assert set(result["depth_codec"]) == {"zstd: ok, depth compressed", "bad value: bad_request naming depth_codec"}, result["depth_codec"]
    assert min(result["depth_codec"].values()) >= 10
    assert result["replies_worker_port"]["disconnect unknown_worker"] > 0 and result["replies_worker_port"]["disconnect unauthorized"] > 0


# ----------------------------------------------------------------------------- in-process broker and worker


class StubEngine:
    """Depth = the grey image; ``gate`` (when given) holds every batch until set; counts calls."""

    device, precision = "cpu", "fp32"
    cuda_graphs = decodes_jpeg = staged = False  # a plain engine: infer only, host decoding

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.calls = 0
        self.started = threading.Event()

    def load(self, model_id):
        return model_id

    def infer(self, images, model_id, *, input_size=518, max_depth=None):
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(20)
        return [image[:, :, 0].astype(np.float32) for image in images]


class Stack:
    """A Broker and (optionally) a Worker with a stub engine, each in a thread, on loopback."""

    def __init__(self, *, broker: dict | None = None, worker: dict | None = None, engine: StubEngine | None = None) -> None:
        self.ctx = zmq.Context()
        options = {"heartbeat": HEARTBEAT, "drain_timeout_s": 0.5, **(broker or {})}
        config = BrokerConfig(clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*", key=KEY, **options)
        self.broker = Broker(config, context=self.ctx)
        self.clients, self.workers = self.broker.bind()
        self.threads = [threading.Thread(target=self.broker.run, daemon=True)]
        self.worker = None
        self.engine = engine
        if worker is not None:
            worker_config = WorkerConfig(broker=self.workers, models=("vits", "vits-hypersim"), key=KEY, heartbeat=HEARTBEAT, warmup_sizes=(), **worker)
            self.engine = engine or StubEngine()
            self.worker = Worker(worker_config, engine=self.engine)
            self.threads.append(threading.Thread(target=self.worker.run, daemon=True))
        for thread in self.threads:
            thread.start()
        if self.worker is not None:
            end = time.monotonic() + 10
            while not self.health()["workers"]:
                assert time.monotonic() < end, "the worker did not register"
                time.sleep(0.02)

    def dealer(self, endpoint: str | None = None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        apply_peer_security(sock, key=KEY, curve=None)  # the key at the handshake, as the broker asks
        sock.connect(endpoint or self.clients)
        return sock

    def health(self) -> dict:
        sock = self.dealer()
        try:
            sock.send_multipart([request_header(id="h", key=KEY, op="health")])
            return reply(sock)[0]["health"]
        finally:
            sock.close()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker.stop()  # at once: a gated batch may still hold requests
        self.broker.stop()
        for thread in self.threads:
            thread.join(10)
        self.ctx.destroy(linger=0)


@pytest.fixture
def stacks():
    made: list[Stack] = []

    def make(**kwargs) -> Stack:
        made.append(Stack(**kwargs))
        return made[-1]

    yield make
    for stack in made:
        if stack.engine is not None and stack.engine.gate is not None:
            stack.engine.gate.set()
        stack.close()


def reply(sock: zmq.Socket, timeout: float = 10.0) -> tuple[dict, list[bytes]]:
    assert sock.poll(timeout * 1000), "no reply"
    frames = sock.recv_multipart()
    return msgpack.unpackb(frames[0]), frames[1:]


def request(op="relative_depth", model="vits", image=IMAGE, *, request_id=None, **params) -> list:
    desc, array = image_descriptor(image)
    header = request_header(id=request_id or uuid.uuid4().hex[:16], key=KEY, op=op, model=model, timeout_ms=20_000)
    return [header, params_frame(desc, **params), array]


def dropped_after(endpoint: str, frames: list, timeout: float = 10.0) -> bool:
    """Send ``frames`` on a fresh DEALER (with the key) once connected; True when the peer drops the connection."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_peer_security(sock, key=KEY, curve=None)
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(endpoint)
        end, sent = time.monotonic() + timeout, False
        while time.monotonic() < end:
            if monitor.poll(100):
                event = recv_monitor_message(monitor)["event"]
                if event == zmq.EVENT_CONNECTED and not sent:
                    sock.send_multipart(frames)
                    sent = True
                elif event == zmq.EVENT_DISCONNECTED and sent:
                    return not sock.poll(200)
        return False
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


# ----------------------------------------------------------------------------- message size


def test_oversized_frame_drops_the_connection_and_the_broker_serves_on(stacks):
    limit = 256 * 1024
    stack = stacks(broker={"max_message_bytes": limit}, worker={"max_message_bytes": limit})
    big = b"\0" * (limit + 1)
    header = request_header(id="big", key=KEY, op="relative_depth", model="vits")
    assert dropped_after(stack.clients, [header, b"params", big])
    assert dropped_after(stack.workers, [command("reply", rid=1, status="ok"), big])
    sock = stack.dealer()
    sock.send_multipart(request(input_size=28))
    header, frames = reply(sock)
    assert header["status"] == "ok" and len(frames) == 1
    assert len(stack.health()["workers"]) == 1


def test_every_socket_limits_message_size_and_queues(stacks):
    from zdepth.client.sockets import configure_socket

    stack = stacks(worker={})
    for sock in (stack.broker._clients, stack.broker._workers):
        assert sock.getsockopt(zmq.MAXMSGSIZE) == stack.broker.config.max_message_bytes
        assert 0 < sock.getsockopt(zmq.SNDHWM) and 0 < sock.getsockopt(zmq.RCVHWM)
    link = stack.worker._link.sock
    assert link.getsockopt(zmq.MAXMSGSIZE) == stack.worker.config.max_message_bytes
    assert 0 < link.getsockopt(zmq.SNDHWM) and 0 < link.getsockopt(zmq.RCVHWM)
    client = zmq.Context.instance().socket(zmq.DEALER)
    configure_socket(client)  # what every Client and AsyncClient socket gets
    try:
        assert client.getsockopt(zmq.MAXMSGSIZE) >= stack.broker.config.max_message_bytes
        assert 0 < client.getsockopt(zmq.SNDHWM) and 0 < client.getsockopt(zmq.RCVHWM)
    finally:
        client.close(0)


# ----------------------------------------------------------------------------- input that crashed a parser


def test_unhashable_op_gets_bad_request(stacks):
    stack = stacks()
    sock = stack.dealer()
    for op in (["relative_depth"], {"op": "health"}):
        sock.send_multipart([pack({"v": VERSION, "id": "u", "key": KEY, "op": op})])
        header, _ = reply(sock)
        assert (header["id"], header["status"]) == ("u", "bad_request") and "unknown op" in header["message"]


def test_unhashable_param_gets_bad_request_and_the_worker_lives(stacks):
    stack = stacks(worker={})
    sock = stack.dealer()
    desc, array = image_descriptor(IMAGE)
    for bad in ([1], {"a": 1}):
        sock.send_multipart([request_header(id="p", key=KEY, op="relative_depth", model="vits"), pack({"image": desc, "depth_dtype": bad}), array])
        header, _ = reply(sock)
        assert header["status"] == "bad_request" and "depth_dtype" in header["message"]
    sock.send_multipart(request(input_size=28))
    assert reply(sock)[0]["status"] == "ok"


# ----------------------------------------------------------------------------- pixels, network input, reply size


def test_jpeg_bomb_behind_a_stray_byte_is_refused_unallocated(monkeypatch):
    data = bytearray(cv2.imencode(".jpg", IMAGE)[1].tobytes())
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", 30_000, 30_000)
    bomb = bytes(data[:at]) + b"\x00" + bytes(data[at:])  # libjpeg skips the stray byte and finds 30000x30000
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded a bomb"))
    with pytest.raises(BadRequest, match="30000x30000"):
        imageio.decode_image(bomb)
    with pytest.raises(BadRequest, match="dimensions"):
        imageio.decode_image(b"\xff\xd8\xff\xe0\x00\x10" + b"\x00" * 64)  # no frame header at all


def test_elongated_image_and_oversized_reply_are_refused_before_inference(stacks):
    # A pixel limit set above what a float32 reply can hold (the default stays within it): the reply size refuses.
    stack = stacks(worker={"max_message_bytes": 64 * 96 * 4 - 1, "max_pixels": 1 << 20})
    sock = stack.dealer()
    sock.send_multipart(request(image=np.zeros((2, 600, 3), np.uint8), input_size=518))
    header, _ = reply(sock)
    assert header["status"] == "bad_request" and "network input" in header["message"], header
    sock.send_multipart(request(input_size=28))  # 64x96 float32 depth: one byte over the limit
    header, _ = reply(sock)
    assert header["status"] == "bad_request" and "depth_dtype='float16'" in header["message"], header
    sock.send_multipart(request(input_size=28, depth_dtype="float16"))  # half of it fits
    assert reply(sock)[0]["status"] == "ok"
    # float16 depth fits, but the points (12 bytes a pixel) do not
    sock.send_multipart(request("pointcloud", "vits-hypersim", input_size=28, intrinsics=[50, 50, 48, 32], depth_dtype="float16"))
    header, _ = reply(sock)
    assert header["status"] == "bad_request" and "on_server=False" in header["message"], header
    assert stack.engine.calls == 1


# ----------------------------------------------------------------------------- bytes held


def test_broker_queue_is_bounded_in_bytes(stacks):
    # No worker: requests wait in the queue (the start-up grace, 2 x 5 s here).
    stack = stacks(broker={"max_queue_bytes": 3000, "heartbeat": Heartbeat(interval_s=1.0, liveness=5)})
    sock = stack.dealer()
    for i in range(5):
        send = [request_header(id=f"q{i}", key=KEY, op="relative_depth", model="vits", timeout_ms=20_000), b"p" * 100, b"i" * 900]
        sock.send_multipart(send)
    header, _ = reply(sock)
    assert header["status"] == "overloaded" and "bytes" in header["message"], header
    assert header["id"] in ("q3", "q4")
    header, _ = reply(sock)
    assert (header["id"], header["status"]) == ("q4", "overloaded")
    health = stack.health()
    assert health["queued_total"] == 3 and health["queued_bytes"] == 3000


def test_worker_bounds_the_image_bytes_it_holds(stacks):
    gate = threading.Event()
    per_image = IMAGE.nbytes * 2  # the raw frame and its decoded pixels
    stack = stacks(worker={"max_held_bytes": 3 * per_image, "max_batch": 1, "capacity": 8}, engine=StubEngine(gate))
    sock = stack.dealer()
    for i in range(6):
        sock.send_multipart(request(input_size=28, request_id=f"h{i}"))
    assert stack.engine.started.wait(10)
    refused = [reply(sock)[0] for _ in range(3)]
    assert {h["id"] for h in refused} == {"h3", "h4", "h5"}
    assert all(h["status"] == "overloaded" and "holds" in h["message"] for h in refused), refused
    gate.set()
    assert {reply(sock)[0]["status"] for _ in range(3)} == {"ok"}
    sock.send_multipart(request(input_size=28))  # all returned: room again
    assert reply(sock)[0]["status"] == "ok"
