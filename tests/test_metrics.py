"""Prometheus metrics, scraped over real HTTP from a real broker process while peers use it.

The broker runs as its own process with ``metrics_port`` set; protocol-level
workers and clients (tests/peers.py) drive requests through it, and each test
scrapes ``/metrics`` before and after to see the numbers move: requests by
status, the latency histograms, the queue, workers by state. WorkerMetrics is
served and scraped the same way from this process.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import msgpack
import prometheus_client  # the test extra installs it (for zdepth itself it is the optional metrics extra)
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

import zdepth
from peers import KEY, PeerWorker, dealer, health, recv_reply, send_request, start_broker, wait_until
from procs import REPO, child_env, free_port
from zdepth.broker import Broker
from zdepth.config import BrokerConfig
from zdepth.errors import ConfigError
from zdepth.metrics import MetricsBindError, WorkerMetrics, serve
from zdepth.protocol import command, request_header

pytestmark = pytest.mark.timeout(120)

BODY = (b"params", b"image")
BODY_BYTES = sum(map(len, BODY))


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of one scrape, keyed by sample name and labels."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, metric: str, /, **labels: str) -> float:
    """A sample's value; 0 for a series not (yet) exported, as Prometheus reads a counter's absence."""
    return samples.get((metric, frozenset(labels.items())), 0.0)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    PeerWorker.stop_all()
    context.destroy(linger=0)


def workers_in_state(ctx, broker, state: str, n: int) -> None:
    wait_until(lambda: [w["state"] for w in health(ctx, broker)["workers"]].count(state) == n, what=f"{n} workers {state}")


def first_request(worker: zmq.Socket, timeout_s: float = 5.0) -> dict:
    """The first request a raw worker socket gets, past the broker's heartbeats sent before it."""
    deadline = time.monotonic() + timeout_s
    while worker.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        message = msgpack.unpackb(worker.recv_multipart()[0])
        if message["cmd"] == "request":
            return message
    raise AssertionError("the worker got no request")


def test_request_counters_and_latency_histograms_move_as_requests_are_served(ctx, tmp_path):
    port = free_port()
    broker = start_broker(tmp_path, metrics_port=port, reconnect_grace_s=60.0)  # unserved models wait, not fail
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        before = scrape(url)
        assert value(before, "zdepth_broker_workers", state="ready") == 0
        assert value(before, "zdepth_broker_info", version=zdepth.__version__) == 1

        PeerWorker(ctx, broker.workers, name="w1", capacity=4)
        workers_in_state(ctx, broker, "ready", 1)
        ready = scrape(url)
        assert value(ready, "zdepth_broker_workers", state="ready") == 1
        assert value(ready, "zdepth_broker_model_workers", model="vits", state="ready") == 1

        client = dealer(ctx, broker.clients)
        for i in range(10):
            send_request(client, f"r{i}", body=BODY)
        replies = [recv_reply(client)[0] for _ in range(10)]
        assert {r["status"] for r in replies} == {"ok"}
        send_request(client, "wrong-key", key="not-the-key")  # proved the key at the handshake, not in the header
        client.send_multipart([request_header(id="one-frame", key=KEY, op="relative_depth", model="vits"), b"params"])
        errors = sorted(recv_reply(client)[0]["status"] for _ in range(2))
        assert errors == ["bad_request", "unauthorized"]
        # A model no worker announced is labelled "other": a client cannot add series by naming models.
        send_request(client, "nobody-serves-it", model="vitg", timeout_ms=3000, body=BODY)
        wait_until(lambda: value(scrape(url), "zdepth_broker_queued_requests", model="other") == 1, what="the request queued as 'other'")
        assert not any(dict(labels).get("model") == "vitg" for _, labels in scrape(url))
        assert recv_reply(client)[0]["status"] == "timeout"

        after = scrape(url)

        def moved(metric: str, **labels: str) -> float:
            return value(after, metric, **labels) - value(ready, metric, **labels)

        assert moved("zdepth_broker_requests_total", op="relative_depth", model="vits", status="ok") == 10
        assert moved("zdepth_broker_requests_total", op="", model="", status="unauthorized") == 1
        assert moved("zdepth_broker_requests_total", op="", model="", status="bad_request") == 1
        assert moved("zdepth_broker_requests_total", op="relative_depth", model="other", status="timeout") == 1
        assert not any(dict(labels).get("model") == "vitg" for _, labels in after)
        assert value(after, "zdepth_broker_requests_total", op="health", model="", status="ok") >= 1  # the polls above
        assert moved("zdepth_broker_round_trip_seconds_count", op="relative_depth", model="vits") == 10
        assert moved("zdepth_broker_round_trip_seconds_sum", op="relative_depth", model="vits") > 0
        assert value(after, "zdepth_broker_round_trip_seconds_bucket", op="relative_depth", model="vits", le="+Inf") == 10
        assert moved("zdepth_broker_queue_wait_seconds_count", model="vits") == 10
        assert value(after, "zdepth_broker_queued_requests", model="vits") == 0
        assert value(after, "zdepth_broker_in_flight_requests", model="vits") == 0
        assert value(after, "zdepth_broker_held_bytes") == 0
        assert value(after, "zdepth_broker_worker_capacity", worker="w1") == 4
        assert value(after, "zdepth_broker_worker_service_seconds", worker="w1") > 0
        assert value(after, "zdepth_broker_state_age_seconds") < 1.0
        assert value(after, "process_resident_memory_bytes") > 0
    finally:
        broker.stop(signal.SIGKILL)


def test_queue_gauges_and_workers_by_state(ctx, tmp_path):
    """One worker in each state at once, and a queue behind a full one: the gauges show each."""
    port = free_port()
    broker = start_broker(tmp_path, interval_s=0.5, liveness=20, metrics_port=port)  # silent after 1 s, dead after 10 s
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        full = PeerWorker(ctx, broker.workers, name="full", models=("vits",), capacity=1, reply_after=None)
        frozen = PeerWorker(ctx, broker.workers, name="frozen", models=("vitb",), capacity=2)
        PeerWorker(ctx, broker.workers, name="stuck", models=("vits-hypersim",), capacity=1, reply_after=None)
        draining = dealer(ctx, broker.workers)
        draining.send_multipart([command("ready", key=KEY, models=["vitl"], capacity=2, info={"name": "draining"})])
        workers_in_state(ctx, broker, "ready", 4)

        client = dealer(ctx, broker.clients)
        for i in range(3):  # one at the full worker, two queued behind it
            send_request(client, f"q{i}", timeout_ms=60_000, body=BODY)
        wait_until(lambda: len(full.received) == 1, what="one request at the full worker")
        send_request(client, "held", model="vitl", timeout_ms=60_000, body=BODY)
        assert first_request(draining)["id"] == "held"
        draining.send_multipart([command("disconnect", reason="draining")])  # holds one: it stays, draining

        frozen.frozen = True  # silent after 1 s, while the next worker misses its deadlines
        for i in range(2):  # two deadlines missed in a row: no new work for it
            send_request(client, f"late{i}", model="vits-hypersim", timeout_ms=200, body=BODY)
            assert recv_reply(client, timeout=10)[0]["status"] == "timeout"
        workers_in_state(ctx, broker, "silent", 1)
        draining.send_multipart([command("heartbeat")])

        samples = scrape(url)
        states = {state: value(samples, "zdepth_broker_workers", state=state) for state in ("ready", "silent", "unhealthy", "draining")}
        assert states == {"ready": 1, "silent": 1, "unhealthy": 1, "draining": 1}
        assert value(samples, "zdepth_broker_model_workers", model="vits", state="ready") == 1
        assert value(samples, "zdepth_broker_model_workers", model="vitb", state="silent") == 1
        assert value(samples, "zdepth_broker_model_workers", model="vitb", state="ready") == 0
        assert value(samples, "zdepth_broker_model_workers", model="vits-hypersim", state="unhealthy") == 1
        assert value(samples, "zdepth_broker_model_workers", model="vitl", state="draining") == 1
        assert value(samples, "zdepth_broker_queued_requests", model="vits") == 2
        assert value(samples, "zdepth_broker_queued_bytes", model="vits") == 2 * BODY_BYTES
        assert value(samples, "zdepth_broker_in_flight_requests", model="vits") == 1
        assert value(samples, "zdepth_broker_in_flight_requests", model="vitl") == 1
        assert value(samples, "zdepth_broker_held_bytes") == 4 * BODY_BYTES
        assert value(samples, "zdepth_broker_worker_in_flight", worker="full") == 1
        assert value(samples, "zdepth_broker_requests_total", op="metric_depth", model="vits-hypersim", status="timeout") == 2
        assert value(samples, "zdepth_broker_queue_limit_requests") == 1024

        # The queue drains into a worker with room, and the gauges follow.
        PeerWorker(ctx, broker.workers, name="spare", models=("vits",), capacity=4)
        assert sorted(recv_reply(client)[0]["id"] for _ in range(2)) == ["q1", "q2"]
        samples = scrape(url)
        assert value(samples, "zdepth_broker_queued_requests", model="vits") == 0
        assert value(samples, "zdepth_broker_queued_bytes", model="vits") == 0
        assert value(samples, "zdepth_broker_model_workers", model="vits", state="ready") == 2
        assert value(samples, "zdepth_broker_queue_wait_seconds_count", model="vits") == 3
    finally:
        broker.stop(signal.SIGKILL)
        draining.close(linger=0)


def test_a_scrape_while_the_loop_is_not_running_reports_the_state_as_old(ctx):
    """The state comes from the broker's own thread; a loop that does not answer shows as an old state, not a hang."""
    config = BrokerConfig(clients="tcp://127.0.0.1:0", workers="tcp://127.0.0.1:0", metrics_port=0)
    with Broker(config, context=ctx, metrics_host="127.0.0.1") as broker:
        broker.bind()
        url = broker.metrics_url
        started = time.monotonic()
        samples = scrape(url)
        assert 0.9 < time.monotonic() - started < 5
        assert value(samples, "zdepth_broker_state_age_seconds") >= 1.0
        assert ("zdepth_broker_workers", frozenset({("state", "ready")})) not in samples
        loop = threading.Thread(target=broker.run)
        loop.start()
        try:
            wait_until(lambda: value(scrape(url), "zdepth_broker_state_age_seconds") < 0.5, what="a fresh state once the loop runs")
            assert value(scrape(url), "zdepth_broker_workers", state="ready") == 0
        finally:
            broker.stop()
            loop.join(10)
        assert not loop.is_alive()
    assert broker.metrics_url is None
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)  # closed with the broker


def test_metrics_are_off_by_default_and_prometheus_client_is_not_imported():
    code = (
        "import sys\n"
        "from zdepth.broker import Broker\n"
        "from zdepth.config import BrokerConfig\n"
        "with Broker(BrokerConfig(clients='tcp://127.0.0.1:0', workers='tcp://127.0.0.1:0')) as broker:\n"
        "    broker.bind()\n"
        "    assert broker.metrics_url is None\n"
        "assert 'prometheus_client' not in sys.modules, 'imported without metrics'\n"
        "assert 'torch' not in sys.modules\n"
        "print('clean')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"


def test_a_metrics_port_in_use_is_refused_by_name(ctx):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = BrokerConfig(clients="tcp://127.0.0.1:0", workers="tcp://127.0.0.1:0", metrics_port=port)
        with Broker(config, context=ctx, metrics_host="127.0.0.1") as broker:
            with pytest.raises(MetricsBindError, match=f"cannot serve metrics on 127.0.0.1:{port}.*in use"):
                broker.bind()
    for bad in (-1, 65536, "9100", True):
        with pytest.raises(ConfigError, match="metrics port"):
            serve(bad, prometheus_client.CollectorRegistry())


def test_worker_metrics_over_http():
    metrics = WorkerMetrics(["vits", "vits-hypersim"], name="gpu-box:1:cuda:0", device="cuda:0")
    held = [0, 0]
    metrics.read_held(lambda: tuple(held))
    metrics.read_device_memory(lambda: {"allocated": 1000 + held[1], "reserved": 4096})
    with serve(0, metrics.registry, "127.0.0.1") as server:
        before = scrape(server.url)
        assert value(before, "zdepth_worker_images_decoded_total", where="cpu") == 0  # present before the first image
        assert value(before, "zdepth_worker_info", version=zdepth.__version__, name="gpu-box:1:cuda:0", device="cuda:0") == 1

        for where in ("cpu", "cpu", "device", "raw"):
            metrics.decoded(where)
        with pytest.raises(ValueError):
            metrics.decoded("gpu")
        metrics.inference(0.012, 3, "vits")
        metrics.inference(0.020, 1, "vits-hypersim")
        for _ in range(3):
            metrics.request_done("relative_depth", "vits", "ok", 0.015)
        metrics.request_done("metric_depth", "vits-hypersim", "timeout", 0.5)
        metrics.request_done("relative_depth", "vitg", "bad_request")  # not a model it serves
        metrics.request_done("relative_depth", "vits", "strange")  # not a protocol status
        held[:] = [2, 5_000]

        after = scrape(server.url)
    assert value(after, "zdepth_worker_images_decoded_total", where="cpu") == 2
    assert value(after, "zdepth_worker_images_decoded_total", where="device") == 1
    assert value(after, "zdepth_worker_images_decoded_total", where="raw") == 1
    assert value(after, "zdepth_worker_inference_seconds_count", model="vits") == 1
    assert value(after, "zdepth_worker_inference_seconds_sum", model="vits") == pytest.approx(0.012)
    assert value(after, "zdepth_worker_batch_size_bucket", model="vits", le="2.0") == 0
    assert value(after, "zdepth_worker_batch_size_bucket", model="vits", le="4.0") == 1
    assert value(after, "zdepth_worker_requests_total", op="relative_depth", model="vits", status="ok") == 3
    assert value(after, "zdepth_worker_requests_total", op="metric_depth", model="vits-hypersim", status="timeout") == 1
    assert value(after, "zdepth_worker_requests_total", op="relative_depth", model="other", status="bad_request") == 1
    assert value(after, "zdepth_worker_requests_total", op="relative_depth", model="vits", status="other") == 1
    assert value(after, "zdepth_worker_request_seconds_count", model="vits") == 3
    assert value(after, "zdepth_worker_held_requests") == 2
    assert value(after, "zdepth_worker_held_bytes") == 5_000
    assert value(after, "zdepth_worker_device_memory_bytes", device="cuda:0", kind="allocated") == 6_000
    assert value(after, "zdepth_worker_device_memory_bytes", device="cuda:0", kind="reserved") == 4096


@pytest.mark.gpu
def test_cuda_memory_follows_what_the_device_holds():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from zdepth.metrics import cuda_memory

    metrics = WorkerMetrics(["vits"], name="w", device="cuda:0")
    metrics.read_device_memory(cuda_memory("cuda:0"))
    with serve(0, metrics.registry, "127.0.0.1") as server:
        before = value(scrape(server.url), "zdepth_worker_device_memory_bytes", device="cuda:0", kind="allocated")
        block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda:0")
        after = scrape(server.url)
        del block
    assert value(after, "zdepth_worker_device_memory_bytes", device="cuda:0", kind="allocated") - before >= 64 * 1024 * 1024
    assert value(after, "zdepth_worker_device_memory_bytes", device="cuda:0", kind="total") >= 64 * 1024 * 1024


def test_a_serving_worker_counts_requests_batches_and_decodes(ctx, tmp_path, weights_dir):
    """A real Worker (CPU engine, generated weights) behind a real broker process, asked by zdepth.Client;
    its /metrics is scraped before and after, and every number the worker reports moves."""
    import numpy as np

    from zdepth.config import Heartbeat, WorkerConfig
    from zdepth.protocol.images import encode_jpeg
    from zdepth.worker import Worker

    broker = start_broker(tmp_path)
    port = free_port()
    config = WorkerConfig(
        broker=broker.workers, key=KEY, models=("vits",), weights_dir=str(weights_dir), warmup_sizes=(), threads=1,
        heartbeat=Heartbeat(0.5, 4), metrics_port=port,
    )  # fmt: skip
    worker = Worker(config)
    errors: list[BaseException] = []

    def serve_worker() -> None:
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=serve_worker, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_until(lambda: len(health(ctx, broker)["workers"]) == 1, timeout=60, what="the worker at the broker")
        before = scrape(url)
        assert value(before, "zdepth_worker_requests_total", op="relative_depth", model="vits", status="ok") == 0
        assert value(before, "zdepth_worker_info", version=zdepth.__version__, name=worker.name, device="cpu") == 1

        image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        with zdepth.Client(broker.clients, key=KEY, timeout=30) as client:
            for _ in range(3):
                assert client.relative_depth(encode_jpeg(image), encoder="vits", input_size=28).depth.shape == (48, 64)
            assert client.relative_depth(image, encoder="vits", input_size=28).depth.shape == (48, 64)  # raw pixels
        after = scrape(url)
    finally:
        worker.stop()
        thread.join(30)
        broker.stop()
    assert not thread.is_alive() and not errors, errors
    assert value(after, "zdepth_worker_requests_total", op="relative_depth", model="vits", status="ok") == 4
    assert value(after, "zdepth_worker_request_seconds_count", model="vits") == 4
    assert value(after, "zdepth_worker_images_decoded_total", where="cpu") == 3
    assert value(after, "zdepth_worker_images_decoded_total", where="raw") == 1
    batches = value(after, "zdepth_worker_inference_seconds_count", model="vits")
    assert 1 <= batches <= 4 and value(after, "zdepth_worker_batch_size_count", model="vits") == batches
    assert value(after, "zdepth_worker_batch_size_sum", model="vits") == 4
    assert value(after, "zdepth_worker_inference_seconds_sum", model="vits") > 0
    assert value(after, "zdepth_worker_held_requests") == 0 and value(after, "zdepth_worker_held_bytes") == 0
    with pytest.raises(OSError):  # the exporter is closed with the worker
        scrape(url)
