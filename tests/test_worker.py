"""The worker against a fake broker: a raw ROUTER socket on a random loopback port.

The worker runs the real Engine on a generated vits checkpoint, with tiny
images (48x64) and network sizes (28, 42) so CPU inference takes milliseconds.
Timing tests wrap the engine in ``GatedEngine``, which holds a forward pass
until the test lets it go: a test double for a busy GPU, nothing more.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

import zdepth
from zdepth import protocol
from zdepth.backoff import backoff_delay
from zdepth.config import Heartbeat, WorkerConfig
from zdepth.errors import ConfigError, Unauthorized, WeightsNotFound
from zdepth.protocol import auth, codec
from zdepth.protocol.images import encode_jpeg
from zdepth.supervisor import EXIT_CONFIG
from zdepth.worker import Worker, run_worker

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
H, W = 48, 64
IMAGE = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
JPEG = encode_jpeg(IMAGE)
STEADY = Heartbeat(interval_s=0.05, liveness=200)  # beats often, but never gives up on a quiet test broker
WAIT_S = 10.0  # ceiling for anything the worker should do "soon"


# ----------------------------------------------------------------------------- the fake broker


class FakeBroker:
    """The broker's side of the wire, driven step by step from the test."""

    def __init__(self, ctx: zmq.Context, port: int | None = None, *, curve=None, key: str | None = None) -> None:
        """``curve`` or ``key``: ask for CurveZMQ, or for the key at the handshake, as a broker does
        (the test starts the authenticator: ``auth.start_broker_auth``)."""
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        auth.apply_broker_security(self.sock, key=key, curve=curve)
        if port is None:
            self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        else:
            self.sock.bind(f"tcp://127.0.0.1:{port}")
            self.port = port
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.heartbeats: dict[bytes, int] = {}
        self.keepalive = False  # when set, heartbeat every worker heard from, as a live broker does
        self._peers: set[bytes] = set()
        self._next_beat = 0.0

    def close(self) -> None:
        self.sock.close(linger=0)

    def recv(self, *, timeout: float = WAIT_S, skip_heartbeats: bool = True) -> tuple[bytes, dict, list[bytes]]:
        """(identity, header, body) of the next message; heartbeats are counted and skipped."""
        deadline = time.monotonic() + timeout
        while True:
            self._beat()
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise AssertionError(f"the worker sent nothing within {timeout} s")
            if not self.sock.poll(min(left_ms, 20) if self.keepalive else left_ms):
                continue
            identity, *frames = self.sock.recv_multipart()
            self._peers.add(identity)
            header = protocol.parse_command(frames[0])
            if header["cmd"] == protocol.HEARTBEAT and skip_heartbeats:
                self.heartbeats[identity] = self.heartbeats.get(identity, 0) + 1
                continue
            return identity, header, frames[1:]

    def _beat(self) -> None:
        if self.keepalive and time.monotonic() >= self._next_beat:
            for identity in self._peers:
                self.send(identity, protocol.HEARTBEAT)
            self._next_beat = time.monotonic() + 0.04

    def expect(self, cmd: str, *, timeout: float = WAIT_S) -> tuple[bytes, dict, list[bytes]]:
        identity, header, body = self.recv(timeout=timeout)
        assert header["cmd"] == cmd, header
        return identity, header, body

    def send(self, identity: bytes, cmd: str, *body: bytes, **fields) -> None:
        self.sock.send_multipart([identity, protocol.command(cmd, **fields), *body])

    def request(self, identity: bytes, rid: int, *, op: str = protocol.OP_RELATIVE, model: str | None = "vits",
                image=JPEG, timeout_ms: float = 30_000, input_size: int | None = 28, params: bytes | None = None,
                **options) -> None:  # fmt: skip
        desc, payload = codec.image_descriptor(image)
        if params is None:
            params = codec.params_frame(desc, input_size=input_size, **options)
        fields = {"rid": rid, "id": f"req-{rid}", "op": op, "model": model, "timeout_ms": timeout_ms, "client": "test"}
        self.send(identity, protocol.REQUEST, params, payload, **fields)

    def replies(self, count: int, *, timeout: float = WAIT_S) -> dict[int, tuple[dict, dict, dict]]:
        """``count`` REPLY messages by rid: (command header, client header, arrays)."""
        out = {}
        while len(out) < count:
            _, header, body = self.expect(protocol.REPLY, timeout=timeout)
            client = msgpack.unpackb(body[0])
            arrays = codec.decode_arrays(client["arrays"], body[1:]) if client["status"] == "ok" else {}
            out[header["rid"]] = (header, client, arrays)
        return out


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def broker(ctx):
    fake = FakeBroker(ctx)
    yield fake
    fake.close()


@pytest.fixture(scope="session")
def engine(weights_dir):
    from zdepth.engine import Engine

    real = Engine(device="cpu", weights_dir=weights_dir)
    real.load("vits")
    real.load("vits-hypersim")
    return real


class GatedEngine:
    """The real engine, but each forward pass waits for the test to open the gate."""

    staged = False  # whole batches through infer, where the gate is

    def __init__(self, engine, *, fail_on_shape: tuple[int, int] | None = None) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls: list[int] = []  # batch sizes
        self.fail_on_shape = fail_on_shape

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def infer(self, images, model_id, **kwargs):
        self.calls.append(len(images))
        self.started.set()
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        if any(image.shape[:2] == self.fail_on_shape for image in images):
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return self.engine.infer(images, model_id, **kwargs)


def make_config(endpoint: str, **overrides) -> WorkerConfig:
    fields = {
        "broker": endpoint,
        "models": ("vits", "vits-hypersim"),
        "key": "sesame",
        "max_batch": 4,
        "max_wait_ms": 20,
        "heartbeat": STEADY,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
        "warmup_sizes": (),
    }
    return WorkerConfig(**{**fields, **overrides})


class Running:
    """A Worker serving in a thread; ``error`` holds what run() raised."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def join(self, timeout: float = WAIT_S) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not return"


@pytest.fixture
def start():
    running: list[Running] = []

    def _start(config: WorkerConfig, engine) -> Running:
        running.append(Running(Worker(config, engine=engine)))
        return running[-1]

    yield _start
    for r in running:
        r.worker.stop()
        r.worker.stop()  # the second stop abandons anything left
        r.join()


# ----------------------------------------------------------------------------- announcing and serving


def test_ready_announces_models_capacity_info_and_key(broker, engine, start):
    config = make_config(broker.endpoint, capacity=5)
    start(config, engine)
    _, header, body = broker.expect(protocol.READY)
    assert body == []
    assert header["v"] == protocol.VERSION
    assert header["key"] == "sesame"
    assert header["models"] == ["vits", "vits-hypersim"]
    assert header["capacity"] == 5
    info = header["info"]
    assert info["pid"] == os.getpid() and info["host"]
    assert info["device"] == "cpu" and info["precision"] == "fp32"
    assert info["version"] == zdepth.__version__ and info["max_batch"] == 4


class RecordingEngine:
    """Records what the worker asks of its engine; answers zeros. For call order only."""

    device, precision = "cpu", "fp32"
    cuda_graphs = decodes_jpeg = staged = False

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def load(self, model_id):
        self.calls.append(("load", model_id))

    def infer(self, images, model_id, **kwargs):
        self.calls.append(("infer", model_id, [image.shape for image in images]))
        return [np.zeros(image.shape[:2], np.float32) for image in images]


def test_cpu_plan_leaves_cores_to_the_worker_and_follows_explicit_choices(monkeypatch):
    from zdepth.worker import CPU_MAX_BATCH, cpu_plan

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    config = WorkerConfig()
    assert [cpu_plan(config, cores).threads for cores in (1, 2, 4, 8, 16, 64)] == [1, 2, 4, 8, 15, 60]
    assert cpu_plan(config, 2).max_batch == CPU_MAX_BATCH
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_plan(config, 16).threads == 3 and "OMP_NUM_THREADS" in cpu_plan(config, 16).why
    plan = cpu_plan(WorkerConfig(threads=5, max_batch=2), 16)
    assert (plan.threads, plan.max_batch) == (5, 2)


def test_a_cpu_worker_says_what_it_chose_in_its_log_and_ready(broker, engine, start, caplog):
    import torch

    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="zdepth.worker"):
            running = start(make_config(broker.endpoint, threads=1, max_batch=None), engine)
            _, header, _ = broker.expect(protocol.READY)
        info = header["info"]
        assert info["threads"] == 1 and info["max_batch"] == 4 and info["pipeline"] is True
        assert header["capacity"] == 8  # twice the chosen batch
        assert running.worker.config.max_batch == 4
        assert any("1 torch threads" in r.getMessage() and "batches of up to 4" in r.getMessage() for r in caplog.records)
    finally:
        torch.set_num_threads(before)


def test_models_are_loaded_and_warmed_before_ready(broker, start):
    recording = RecordingEngine()
    start(make_config(broker.endpoint, warmup_sizes=((H, W), (30, 40))), recording)
    broker.expect(protocol.READY)
    assert recording.calls == [
        ("load", "vits"),
        ("infer", "vits", [(H, W, 3)]),
        ("infer", "vits", [(30, 40, 3)]),
        ("load", "vits-hypersim"),
        ("infer", "vits-hypersim", [(H, W, 3)]),
        ("infer", "vits-hypersim", [(30, 40, 3)]),
    ]


def test_warm_up_covers_every_padded_batch_size_with_cuda_graphs(broker, start):
    recording = RecordingEngine()
    recording.cuda_graphs = True  # what a CUDA engine with cuda_graphs=True reports
    start(make_config(broker.endpoint, models=("vits",), max_batch=6, warmup_sizes=((48, 64),)), recording)
    broker.expect(protocol.READY)
    batches = [len(call[2]) for call in recording.calls if call[0] == "infer"]
    assert batches == [1, 2, 4, 8]  # batches of 5 and 6 run padded to 8


def test_stop_while_loading_returns_without_announcing(broker, start):
    recording = RecordingEngine()
    loading, release = threading.Event(), threading.Event()

    def slow_load(model_id):
        loading.set()
        assert release.wait(WAIT_S)

    recording.load = slow_load
    running = start(make_config(broker.endpoint), recording)
    assert loading.wait(WAIT_S)
    running.worker.stop()
    release.set()
    running.join()
    assert running.error is None
    with pytest.raises(AssertionError, match="sent nothing"):
        broker.recv(timeout=0.2)


def test_a_missing_checkpoint_makes_run_raise(broker, engine, start):
    running = start(make_config(broker.endpoint, models=("vitb",)), engine)  # only vits was generated
    running.join()
    assert isinstance(running.error, WeightsNotFound)
    assert "depth_anything_v2_vitb.pth" in str(running.error)


def test_relative_depth_reply(broker, engine, start):
    start(make_config(broker.endpoint), engine)
    identity, _, _ = broker.expect(protocol.READY)
    broker.request(identity, 7)
    ((rid, (command, header, arrays)),) = broker.replies(1).items()
    assert rid == 7 and command["status"] == "ok"
    assert header["id"] == "req-7" and header["status"] == "ok" and header["model"] == "vits"
    assert header["worker"].endswith(f":{os.getpid()}:cpu")
    depth = arrays["depth"]
    assert depth.shape == (H, W) and depth.dtype == np.float32
    expected = engine.infer([_decoded_jpeg()], "vits", input_size=28)[0]
    np.testing.assert_allclose(depth, expected, rtol=1e-5, atol=1e-5)
    assert header["min"] == pytest.approx(float(depth.min())) and header["max"] == pytest.approx(float(depth.max()))
    assert set(header["timings"]) == {"queue_ms", "infer_ms", "worker_ms"}
    assert all(v >= 0 for v in header["timings"].values())


def _decoded_jpeg() -> np.ndarray:
    from zdepth.protocol.images import decode_image

    return decode_image(JPEG)


def test_raw_image_and_float16_depth(broker, engine, start):
    start(make_config(broker.endpoint), engine)
    identity, _, _ = broker.expect(protocol.READY)
    broker.request(identity, 1, image=IMAGE, depth_dtype="float16", input_size=42)
    _, header, arrays = broker.replies(1)[1]
    assert header["arrays"] == [{"name": "depth", "dtype": "<f2", "shape": [H, W]}]
    expected = engine.infer([IMAGE], "vits", input_size=42)[0]
    np.testing.assert_array_equal(arrays["depth"], expected.astype(np.float16))  # cast by the engine, rounded alike
    assert (header["min"], header["max"]) == (float(expected.min()), float(expected.max()))  # from the float32 values


def test_pointcloud_from_a_metric_model(broker, engine, start):
    start(make_config(broker.endpoint), engine)
    identity, _, _ = broker.expect(protocol.READY)
    fx, fy, cx, cy = 50.0, 55.0, 31.5, 23.5
    broker.request(identity, 3, op=protocol.OP_POINTCLOUD, model="vits-hypersim", image=IMAGE,
                   intrinsics=[fx, fy, cx, cy], max_depth=5.0)  # fmt: skip
    _, header, arrays = broker.replies(1)[3]
    depth, points = arrays["depth"], arrays["points"]
    assert header["model"] == "vits-hypersim"
    assert depth.shape == (H, W) and points.shape == (H * W, 3) and points.dtype == np.float32
    assert 0 < header["max"] <= 5.0
    np.testing.assert_array_equal(points[:, 2], depth.reshape(-1))
    v, u = divmod(100, W)
    np.testing.assert_allclose(points[100, :2], [(u - cx) * depth[v, u] / fx, (v - cy) * depth[v, u] / fy], rtol=1e-5)


def test_bad_requests_fail_alone_while_good_ones_in_the_batch_succeed(broker, engine, start):
    start(make_config(broker.endpoint, max_batch=8, max_wait_ms=300), engine)
    identity, _, _ = broker.expect(protocol.READY)
    broker.request(identity, 1)
    broker.request(identity, 2, image=b"\xff\xd8\xff\xe0 this is not really a jpeg")  # fails in the batch
    broker.request(identity, 3, input_size=30)  # not a multiple of 14
    broker.request(identity, 4, op=protocol.OP_METRIC, model="vits")  # metric op, relative model
    broker.request(identity, 5, model="vitl")  # not served here
    broker.request(identity, 6, params=b"\xc1")  # not msgpack
    broker.request(identity, 7, image=IMAGE)
    replies = broker.replies(7)
    for rid in (1, 7):
        command, header, arrays = replies[rid]
        assert command["status"] == "ok" and arrays["depth"].shape == (H, W)
        assert header["batch"] == 2  # they ran together, the undecodable image beside them did not
    expected = {2: "bad_request", 3: "bad_request", 4: "bad_request", 5: "unknown_model", 6: "bad_request"}
    for rid, code in expected.items():
        command, header, _ = replies[rid]
        assert command["status"] == code and header["status"] == code and header["id"] == f"req-{rid}", header
        assert header["message"]
    assert "input_size" in replies[3][1]["message"]
    assert "metric" in replies[4][1]["message"]


class KindRecordingEngine:
    """The real engine; remembers what kind of image (array or EncodedJpeg) each infer call got."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.kinds: list[str] = []

    staged = False  # whole batches through infer, which records them

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def infer(self, images, model_id, **kwargs):
        self.kinds += [type(image).__name__ for image in images]
        return self.engine.infer(images, model_id, **kwargs)


def test_jpegs_go_to_an_engine_that_decodes_them_and_the_rest_to_the_pool(broker, weights_dir, start):
    """With an engine that decodes JPEGs on its device (CUDA's pipeline, run here on the CPU with
    torchvision's decoder), plain JPEGs reach it encoded; others are decoded by cv2 first; bad ones
    fail alone, with the same errors as from the pool."""
    import struct

    from zdepth.engine import Engine

    real = Engine(device="cpu", weights_dir=weights_dir, preprocess="torch", jpeg_decoder="device")
    engine = KindRecordingEngine(real)
    start(make_config(broker.endpoint, max_batch=8, max_wait_ms=300), engine)
    identity, _, _ = broker.expect(protocol.READY)
    sof = JPEG.index(b"\xff\xc0")
    bomb = JPEG[: sof + 5] + struct.pack(">HH", 10_000, 10_000) + JPEG[sof + 9 :]
    app1 = b"Exif\0\0II*\0" + struct.pack("<IHHHIHHI", 8, 1, 0x0112, 3, 1, 1, 0, 0)
    exif = JPEG[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + JPEG[2:]
    broker.request(identity, 1)
    broker.request(identity, 2, image=exif)
    broker.request(identity, 3, image=IMAGE)
    broker.request(identity, 4, image=JPEG[:200] + bytes(len(JPEG) - 202) + b"\xff\xd9")  # a good header, zeros, the end
    broker.request(identity, 5, image=bomb)
    replies = broker.replies(5)
    # One batch of 1-4 (5 failed on its header), then 1-4 one by one after 4 failed the batch.
    assert engine.kinds == ["EncodedJpeg", "ndarray", "ndarray", "EncodedJpeg"] * 2
    for rid, image in ((1, _decoded_jpeg()), (2, _decoded_jpeg()), (3, IMAGE)):
        command, header, arrays = replies[rid]
        assert command["status"] == "ok", header
        expected = real.infer([image], "vits", input_size=28)[0]
        np.testing.assert_allclose(arrays["depth"], expected, rtol=1e-4, atol=1e-5)
    assert replies[4][0]["status"] == "bad_request" and "could not decode" in replies[4][1]["message"]
    assert replies[5][0]["status"] == "bad_request" and "10000x10000" in replies[5][1]["message"]


def test_an_engine_failure_fails_only_its_own_request(broker, engine, start, caplog):
    gated = GatedEngine(engine, fail_on_shape=(32, 32))
    gated.gate.set()
    start(make_config(broker.endpoint, max_wait_ms=300), gated)
    identity, _, _ = broker.expect(protocol.READY)
    poison = np.zeros((32, 32, 3), np.uint8)
    with caplog.at_level(logging.ERROR, logger="zdepth.worker"):
        broker.request(identity, 1, image=IMAGE)
        broker.request(identity, 2, image=poison)
        broker.request(identity, 3, image=IMAGE)
        replies = broker.replies(3)
    assert [replies[r][0]["status"] for r in (1, 2, 3)] == ["ok", "internal", "ok"]
    assert "illegal memory access" in replies[2][1]["message"]
    assert gated.calls[0] == 3  # the batch failed as a whole, then each was retried alone
    assert any(r.exc_info for r in caplog.records), "the traceback is logged"
    broker.request(identity, 4)  # and the worker keeps serving
    assert broker.replies(1)[4][0]["status"] == "ok"


def test_an_expired_deadline_times_out_without_inference(broker, engine, start):
    gated = GatedEngine(engine)
    start(make_config(broker.endpoint, max_batch=1), gated)
    identity, _, _ = broker.expect(protocol.READY)
    broker.request(identity, 1)  # occupies the "GPU"
    assert gated.started.wait(WAIT_S)
    broker.request(identity, 2, timeout_ms=50)  # will expire while waiting behind it
    time.sleep(0.2)
    gated.gate.set()
    replies = broker.replies(2)
    assert replies[1][0]["status"] == "ok"
    assert replies[2][0]["status"] == "timeout" and "deadline" in replies[2][1]["message"]
    assert gated.calls == [1], "the late request never reached the model"


def test_info_gets_a_summary_and_state_changes_not_a_line_per_request(broker, engine, start, caplog):
    # One summary window holds the whole burst: 1.5 s, against the 0.2-0.5 s the 8 requests take on a loaded machine.
    running = start(make_config(broker.endpoint, summary_interval_s=1.5), engine)
    with caplog.at_level(logging.DEBUG, logger="zdepth.worker"):
        identity, _, _ = broker.expect(protocol.READY)
        for rid in range(1, 7):
            broker.request(identity, rid)
        broker.request(identity, 7, input_size=30)  # refused: not a multiple of 14
        broker.request(identity, 8, model="vitl")  # not served here
        replies = broker.replies(8)
        assert [replies[r][0]["status"] for r in range(1, 9)] == ["ok"] * 6 + ["bad_request", "unknown_model"]
        time.sleep(1.7)
        running.worker.stop()
        running.join()
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    summaries = [m for m in info if " ok, " in m]
    assert len(summaries) == 1, info
    assert "8 requests" in summaries[0] and "6 ok" in summaries[0] and "1 bad_request" in summaries[0], summaries
    assert "1 unknown_model" in summaries[0] and "p50" in summaries[0] and "p99" in summaries[0] and "batches" in summaries[0]
    for state in ("connected to broker", "registered with broker", "draining", "drained"):
        assert any(state in m for m in info), (state, info)
    assert not any("req-" in m for m in info), "no INFO line names a request"
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum("'req-" in m for m in debug) == 8, debug


# ----------------------------------------------------------------------------- the pipeline


class StagedGates:
    """The real engine's three steps, each able to hold until the test opens its gate; records the order."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.events: list[tuple[str, int]] = []  # (step, first image's height)
        self.gates = {step: threading.Event() for step in ("prepare", "run", "collect")}
        self.entered = {step: threading.Event() for step in self.gates}
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _step(self, step: str, height: int) -> None:
        with self.lock:
            self.events.append((step, height))
        self.entered[step].set()
        assert self.gates[step].wait(WAIT_S), f"the test never opened {step}"

    def prepare(self, image, input_size=518):
        self._step("prepare", image.shape[0])
        return self.engine.prepare(image, input_size)

    def run(self, prepared, model_id, **options):
        self._step("run", prepared[0].shape[0])
        return self.engine.run(prepared, model_id, **options)

    def collect(self, pending):
        self._step("collect", pending.depths[0].shape[0])
        return self.engine.collect(pending)


def test_the_next_batch_is_prepared_and_the_last_replied_while_one_runs(broker, engine, start):
    """Three requests of different sizes (so each is its own batch): while the first is held in the
    forward pass, the second is prepared; while the first's depth maps are collected, the second runs."""
    staged = StagedGates(engine)
    staged.gates["prepare"].set()
    start(make_config(broker.endpoint, max_batch=1), staged)
    identity, _, _ = broker.expect(protocol.READY)
    images = [np.zeros((h, 40, 3), np.uint8) for h in (30, 31, 32)]
    broker.request(identity, 1, image=images[0])
    assert staged.entered["run"].wait(WAIT_S)  # batch 1 on the "device", held there
    broker.request(identity, 2, image=images[1])
    deadline = time.monotonic() + WAIT_S
    while ("prepare", 31) not in staged.events:
        assert time.monotonic() < deadline, f"request 2 was not prepared while batch 1 ran: {staged.events}"
        time.sleep(0.01)
    staged.entered["run"].clear()
    staged.gates["run"].set()  # batch 1 finishes on the device; its collect is held
    assert staged.entered["collect"].wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while ("run", 31) not in staged.events:
        assert time.monotonic() < deadline, f"batch 2 did not start while batch 1's replies waited: {staged.events}"
        time.sleep(0.01)
    broker.request(identity, 3, image=images[2])
    staged.gates["collect"].set()
    replies = broker.replies(3)
    assert [replies[r][2]["depth"].shape for r in (1, 2, 3)] == [(30, 40), (31, 40), (32, 40)]
    for rid, image in zip((1, 2, 3), images):
        np.testing.assert_allclose(replies[rid][2]["depth"], engine.infer([image], "vits", input_size=28)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pipeline", [True, False])
def test_both_worker_loops_serve_the_same_replies(broker, engine, start, pipeline):
    start(make_config(broker.endpoint, pipeline=pipeline, max_wait_ms=100), engine)
    identity, _, _ = broker.expect(protocol.READY)
    broker.request(identity, 1)
    broker.request(identity, 2, image=IMAGE, op=protocol.OP_METRIC, model="vits-hypersim", max_depth=4.0)
    broker.request(identity, 3, image=IMAGE)
    broker.request(identity, 4, image=b"\xff\xd8\xff\xe0 garbage")
    replies = broker.replies(4)
    assert [replies[r][0]["status"] for r in (1, 2, 3, 4)] == ["ok", "ok", "ok", "bad_request"]
    np.testing.assert_allclose(replies[3][2]["depth"], engine.infer([IMAGE], "vits", input_size=28)[0], rtol=1e-5, atol=1e-5)
    metric = engine.infer([IMAGE], "vits-hypersim", input_size=28, max_depth=4.0)[0]
    np.testing.assert_allclose(replies[2][2]["depth"], metric, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- heartbeats and reconnection


def test_heartbeats_keep_flowing_while_a_batch_runs(broker, engine, start):
    gated = GatedEngine(engine)
    start(make_config(broker.endpoint), gated)
    identity, _, _ = broker.expect(protocol.READY)
    broker.request(identity, 1)
    assert gated.started.wait(WAIT_S)
    before = broker.heartbeats.get(identity, 0)
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:  # the model is "busy" all this time
        with pytest.raises(AssertionError, match="sent nothing"):
            broker.recv(timeout=max(0.01, deadline - time.monotonic()))
    assert broker.heartbeats[identity] - before >= 6  # about 12 at 50 ms
    gated.gate.set()
    assert broker.replies(1)[1][0]["status"] == "ok"


def test_reconnects_and_announces_again_after_the_broker_restarts(ctx, broker, engine, start):
    config = make_config(broker.endpoint, heartbeat=Heartbeat(interval_s=0.05, liveness=4))
    start(config, engine)
    broker.keepalive = True
    first, _, _ = broker.expect(protocol.READY)
    broker.request(first, 1)
    assert broker.replies(1)[1][0]["status"] == "ok"
    broker.close()  # the broker dies; its port stays free for the next one
    time.sleep(0.3)
    reborn = FakeBroker(ctx, broker.port)
    reborn.keepalive = True
    try:
        # Until the first heartbeat lands, a fresh link may still time out and announce itself once more.
        identity, header, _ = reborn.expect(protocol.READY)
        for _attempt in range(3):
            assert identity != first, "a fresh socket, as the Paranoid Pirate worker does"
            assert header["key"] == "sesame"
            reborn.request(identity, 2)
            identity, header, _ = reborn.recv()
            if header["cmd"] == protocol.REPLY:
                assert header["rid"] == 2 and header["status"] == "ok"
                break
            assert header["cmd"] == protocol.READY
        else:
            pytest.fail("no request served after the broker came back")
    finally:
        reborn.close()


def test_unknown_worker_disconnect_makes_it_announce_again(broker, engine, start):
    start(make_config(broker.endpoint), engine)
    first, _, _ = broker.expect(protocol.READY)
    broker.send(first, protocol.DISCONNECT, reason=protocol.REASON_UNKNOWN_WORKER)
    second, header, _ = broker.expect(protocol.READY)
    assert second != first and header["key"] == "sesame"
    broker.request(second, 1)
    assert broker.replies(1)[1][0]["status"] == "ok"


# ----------------------------------------------------------------------------- several brokers


@pytest.fixture
def two(ctx):
    """Two fake brokers, for a worker that serves both."""
    pair = FakeBroker(ctx), FakeBroker(ctx)
    yield pair
    for fake in pair:
        fake.close()


def quiet_for(broker: FakeBroker, seconds: float) -> list[dict]:
    """Every message but heartbeats that ``broker`` gets within ``seconds``."""
    seen, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            seen.append(broker.recv(timeout=left)[1])
        except AssertionError:
            break
    return seen


def test_each_broker_gets_a_ready_with_the_full_capacity_and_its_own_replies(two, engine, start):
    a, b = two
    running = start(make_config(f"{a.endpoint},{b.endpoint}", capacity=5), engine)
    id_a, ready_a, _ = a.expect(protocol.READY)
    id_b, ready_b, _ = b.expect(protocol.READY)
    assert ready_a["capacity"] == ready_b["capacity"] == 5 and ready_a["info"] == ready_b["info"]
    a.request(id_a, 1)
    b.request(id_b, 2, op=protocol.OP_METRIC, model="vits-hypersim")
    a.request(id_a, 3)
    assert sorted(a.replies(2)) == [1, 3]
    (header, client, _), = b.replies(1).values()
    assert header["rid"] == 2 and client["model"] == "vits-hypersim"
    assert not [h for h in quiet_for(a, 0.3) if h["cmd"] == protocol.REPLY]  # nothing of b's came to a

    running.worker.stop()  # the drain tells both
    assert a.expect(protocol.DISCONNECT)[1]["reason"] == b.expect(protocol.DISCONNECT)[1]["reason"] == "draining"
    running.join()
    assert running.error is None


def test_a_reply_is_dropped_only_for_the_link_that_reconnected(two, engine, start):
    a, b = two
    gated = GatedEngine(engine)
    start(make_config(f"{a.endpoint},{b.endpoint}", max_batch=1), gated)
    id_a, _, _ = a.expect(protocol.READY)
    id_b, _, _ = b.expect(protocol.READY)
    a.request(id_a, 1)
    b.request(id_b, 2)
    assert gated.started.wait(WAIT_S)
    a.send(id_a, protocol.DISCONNECT, reason=protocol.REASON_UNKNOWN_WORKER)  # a forgot the worker: it announces again
    fresh, _, _ = a.expect(protocol.READY)
    assert fresh != id_a
    gated.gate.set()
    assert list(b.replies(1)) == [2]
    assert not [h for h in quiet_for(a, 0.5) if h["cmd"] == protocol.REPLY]  # rid 1 belonged to the old connection
    a.request(fresh, 3)
    assert list(a.replies(1)) == [3]


def test_a_broker_that_refuses_the_key_is_given_up_while_the_other_serves(two, engine, start, caplog):
    a, b = two
    with caplog.at_level(logging.ERROR, logger="zdepth.worker"):
        running = start(make_config(f"{a.endpoint},{b.endpoint}"), engine)
        id_a, _, _ = a.expect(protocol.READY)
        id_b, _, _ = b.expect(protocol.READY)
        a.send(id_a, protocol.DISCONNECT, reason=protocol.REASON_UNAUTHORIZED)
        b.request(id_b, 1)
        assert b.replies(1)[1][0]["status"] == "ok"
        assert quiet_for(a, 0.5) == []  # never announced to it again
    assert running.thread.is_alive() and running.error is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(a.endpoint in m and f"serving only {b.endpoint}" in m for m in errors), errors


def test_unauthorized_disconnect_makes_run_raise(broker, engine, start):
    running = start(make_config(broker.endpoint, key="wrong"), engine)
    identity, header, _ = broker.expect(protocol.READY)
    assert header["key"] == "wrong"
    broker.send(identity, protocol.DISCONNECT, reason=protocol.REASON_UNAUTHORIZED)
    running.join()
    assert isinstance(running.error, Unauthorized)
    assert broker.endpoint in str(running.error) and "--key-file" in str(running.error)  # which broker, and what to do


def test_run_worker_returns_2_on_a_wrong_key(broker, weights_dir):
    """run_worker builds its own Engine from the config and reports failure as its exit status:
    a key the broker refuses is a setting to fix, so the status is the permanent EXIT_CONFIG."""
    config = make_config(broker.endpoint, key="wrong", models=("vits",), weights_dir=str(weights_dir))
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(run_worker(config)), daemon=True)
    thread.start()
    identity, _, _ = broker.expect(protocol.READY)
    broker.send(identity, protocol.DISCONNECT, reason=protocol.REASON_UNAUTHORIZED)
    thread.join(WAIT_S)
    assert status == [EXIT_CONFIG]


def test_backoff_doubles_with_jitter_within_bounds():
    assert backoff_delay(0, 0.25, 8.0) == 0.25
    for failures in range(12):
        ceiling = min(8.0, 0.25 * 2**failures)
        delays = [backoff_delay(failures, 0.25, 8.0) for _ in range(50)]
        assert all(max(0.25, ceiling / 2) <= d <= ceiling for d in delays)
    assert len({backoff_delay(10, 0.25, 8.0) for _ in range(20)}) > 1  # jittered
    assert backoff_delay(10_000, 0.25, 8.0) <= 8.0


def test_announces_itself_over_curvezmq(ctx, engine, start, tmp_path):
    from zdepth.protocol.curve import CurveClient, CurveServer, generate, start_authenticator

    server_public, server_secret = generate(tmp_path / "server", "broker")
    _, worker_secret = generate(tmp_path / "allowed", "gpu-box")
    server = CurveServer(server_secret, tmp_path / "allowed")
    auth = start_authenticator(ctx, server)
    secure = FakeBroker(ctx, curve=server)
    try:
        start(make_config(secure.endpoint, curve=CurveClient(worker_secret, server_public)), engine)
        identity, header, _ = secure.expect(protocol.READY)
        assert header["key"] == "sesame"
        secure.request(identity, 1)
        assert secure.replies(1)[1][0]["status"] == "ok"
    finally:
        secure.close()
        auth.stop()


# ----------------------------------------------------------------------------- the key at the handshake


@pytest.fixture
def keyed(ctx):
    """A fake broker that asks for the key "sesame" at the handshake, with its authenticator."""
    authenticator = auth.start_broker_auth(ctx, key="sesame", curve=None)
    fake = FakeBroker(ctx, key="sesame")
    yield fake
    fake.close()
    authenticator.stop()


def test_proves_the_key_at_the_handshake(keyed, engine, start, caplog):
    with caplog.at_level(logging.INFO, logger="zdepth.worker"):
        start(make_config(keyed.endpoint), engine)
        identity, header, _ = keyed.expect(protocol.READY)
        assert header["key"] == "sesame"
        keyed.request(identity, 1)
        assert keyed.replies(1)[1][0]["status"] == "ok"
    messages = [r.getMessage() for r in caplog.records]
    assert any("connected to broker" in m and "key at the handshake" in m for m in messages), messages
    assert not any("takes no key" in m for m in messages)


def test_a_key_refused_at_the_handshake_is_final(keyed, engine, start, caplog):
    """No READY ever reaches the broker, and run() raises at once instead of retrying forever."""
    with caplog.at_level(logging.ERROR, logger="zdepth.worker"):
        running = start(make_config(keyed.endpoint, key="wrong"), engine)
        running.join()
    assert isinstance(running.error, Unauthorized)
    assert "refused this worker's key at the handshake" in str(running.error) and "--key-file" in str(running.error)
    with pytest.raises(AssertionError, match="sent nothing"):
        keyed.recv(timeout=0.2)


def test_no_key_for_a_broker_that_asks_for_one_is_final(keyed, engine, start):
    running = start(make_config(keyed.endpoint, key=None), engine)
    running.join()
    assert isinstance(running.error, Unauthorized) and "ZDEPTH_KEY" in str(running.error)


def test_a_broker_without_a_key_gets_a_connection_without_plain(broker, engine, start, caplog):
    """A broker started without a key answers PLAIN with a mechanism mismatch: the worker says so
    once and connects again without it, then serves."""
    with caplog.at_level(logging.INFO, logger="zdepth.worker"):
        start(make_config(broker.endpoint), engine)
        identity, header, _ = broker.expect(protocol.READY)
        assert header["key"] == "sesame"  # still in READY, which a keyless broker ignores
        broker.request(identity, 1)
        assert broker.replies(1)[1][0]["status"] == "ok"
    switches = [r for r in caplog.records if "takes no key at the handshake" in r.getMessage()]
    assert len(switches) == 1, [r.getMessage() for r in caplog.records]
    assert any("connected to broker" in r.getMessage() and "no handshake security" in r.getMessage() for r in caplog.records)


def test_run_worker_exits_2_when_the_handshake_refuses_the_key(keyed, weights_dir):
    config = make_config(keyed.endpoint, key="wrong", models=("vits",), weights_dir=str(weights_dir))
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(run_worker(config)), daemon=True)
    thread.start()
    thread.join(WAIT_S * 3)
    assert status == [EXIT_CONFIG]


def test_a_certificate_outside_the_allow_list_is_final(ctx, engine, start, tmp_path):
    from zdepth.protocol.curve import CurveClient, CurveServer, generate

    server_public, server_secret = generate(tmp_path / "server", "broker")
    (tmp_path / "allowed").mkdir()
    _, stranger_secret = generate(tmp_path / "elsewhere", "stranger")
    server = CurveServer(server_secret, tmp_path / "allowed")
    authenticator = auth.start_broker_auth(ctx, key="sesame", curve=server)
    secure = FakeBroker(ctx, curve=server)
    try:
        running = start(make_config(secure.endpoint, curve=CurveClient(stranger_secret, server_public)), engine)
        running.join()
        assert isinstance(running.error, Unauthorized) and "allow directory" in str(running.error)
    finally:
        secure.close()
        authenticator.stop()


def test_a_missing_certificate_fails_before_loading(engine, tmp_path):
    from zdepth.protocol.curve import CurveClient

    curve = CurveClient(tmp_path / "nope.key_secret", tmp_path / "broker.key")
    with pytest.raises(ConfigError, match="certificate"):
        Worker(make_config("tcp://127.0.0.1:1", curve=curve), engine=engine)


# ----------------------------------------------------------------------------- draining


def test_stop_drains_everything_held_then_returns(broker, engine, start):
    gated = GatedEngine(engine)
    running = start(make_config(broker.endpoint, max_batch=2, max_wait_ms=50), gated)
    identity, _, _ = broker.expect(protocol.READY)
    for rid in range(1, 6):
        broker.request(identity, rid)
    assert gated.started.wait(WAIT_S)
    running.worker.stop()
    _, header, _ = broker.expect(protocol.DISCONNECT)
    assert header["reason"] == "draining"
    gated.gate.set()
    replies = broker.replies(5)
    assert sorted(replies) == [1, 2, 3, 4, 5]
    assert all(command["status"] == "ok" for command, _, _ in replies.values())
    running.join()
    assert running.error is None


def test_stop_without_a_broker_returns_promptly(engine, start):
    running = start(make_config("tcp://127.0.0.1:1"), engine)  # nobody listens there
    time.sleep(0.2)
    started = time.monotonic()
    running.worker.stop()
    running.join()
    assert time.monotonic() - started < 2.0 and running.error is None


def test_worker_process_drains_on_sigterm(broker, weights_dir, tmp_path):
    """The real thing: a worker process, its signal handlers, its exit status."""
    script = textwrap.dedent(f"""
        import logging, sys
        from zdepth.config import Heartbeat, WorkerConfig
        from zdepth.worker import run_worker
        logging.basicConfig(level=logging.INFO)
        config = WorkerConfig(broker={broker.endpoint!r}, models=("vits",), key="sesame", weights_dir={str(weights_dir)!r},
                              warmup_sizes=(), heartbeat=Heartbeat(0.05, 200))
        sys.exit(run_worker(config))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=log_file)
    try:
        identity, header, _ = broker.expect(protocol.READY, timeout=60)
        assert header["info"]["pid"] == proc.pid
        broker.request(identity, 1)
        assert broker.replies(1)[1][0]["status"] == "ok"
        broker.request(identity, 2)
        proc.send_signal(signal.SIGTERM)
        seen = {}
        while "disconnect" not in seen or 2 not in seen:
            _, header, _ = broker.recv()
            seen[header.get("rid", header["cmd"])] = header
        assert seen["disconnect"]["reason"] == "draining"
        assert seen[2]["status"] == "ok"
        assert proc.wait(timeout=WAIT_S) == 0
        assert "drained" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        print(log_path.read_text())  # shown by pytest when the test fails
