"""The broker over real loopback sockets, with workers played by protocol-speaking test peers.

These pin the broker's own rules (auth, routing, load, deadlines, eviction,
re-queueing, draining) precisely; tests/test_serving.py runs the real worker.
"""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from zdepth import testing
from zdepth.broker import Broker
from zdepth.config import BrokerConfig, Heartbeat
from zdepth.protocol import VERSION, command, request_header

pytestmark = pytest.mark.timeout(30)

KEY = "s3cret"
HEARTBEAT = Heartbeat(interval_s=0.1, liveness=3)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def start_broker(ctx, **overrides):
    config = BrokerConfig(clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*", key=KEY, heartbeat=HEARTBEAT, drain_timeout_s=0.5, reconnect_grace_s=0.6, **overrides)
    broker = Broker(config, context=ctx)
    broker.bind()
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    return broker, thread


@pytest.fixture
def broker(ctx):
    broker, thread = start_broker(ctx)
    yield broker
    broker.stop()
    thread.join(10)


def dealer(ctx, endpoint, *, key=KEY):
    """A raw DEALER that proves ``key`` at the handshake, as every zdepth peer of a keyed broker does."""
    return testing.dealer(ctx, endpoint, key=key)


def recv(sock, timeout=3.0):
    if not sock.poll(timeout * 1000):
        raise AssertionError("no message within %.1f s" % timeout)
    return sock.recv_multipart()


def nothing(sock, wait=0.3):
    return not sock.poll(wait * 1000)


class PeerWorker:
    """A worker reduced to the protocol and driven by the test itself: READY, heartbeats on demand, replies
    by hand (``zdepth.testing.FakeWorker`` is the one that runs on its own thread)."""

    def __init__(self, ctx, endpoint, models=("vits",), capacity=4, key=KEY):
        self.sock = dealer(ctx, endpoint, key=key)
        self.sock.send_multipart([command("ready", key=key, models=list(models), capacity=capacity, info={"name": f"peer-{id(self)}"})])

    def beat(self):
        self.sock.send_multipart([command("heartbeat")])

    def next_request(self, timeout=3.0):
        """The next REQUEST (heartbeats skipped, and answered so we stay alive)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            frames = recv(self.sock, end - time.monotonic())
            header = msgpack.unpackb(frames[0])
            if header["cmd"] == "request":
                return header, frames[1:]
            self.beat()
        raise AssertionError("no request")

    def has_request(self, wait=0.3):
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not self.sock.poll(max(1, (end - time.monotonic()) * 1000)):
                return False
            header = msgpack.unpackb(self.sock.recv_multipart()[0])
            if header["cmd"] == "request":
                return True
            self.beat()
        return False

    def reply(self, header, payload=b"result", status="ok"):
        client_header = msgpack.packb({"v": VERSION, "id": header["id"], "status": status})
        self.sock.send_multipart([command("reply", rid=header["rid"], status=status), client_header, payload])

    def keep_alive(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.beat()
            time.sleep(0.05)


def send_request(sock, request_id="r1", *, key=KEY, op="relative_depth", model="vits", timeout_ms=None, body=(b"params", b"image")):
    sock.send_multipart([request_header(id=request_id, key=key, op=op, model=model, timeout_ms=timeout_ms), *body])


def reply_header(frames):
    return msgpack.unpackb(frames[0])


def health(ctx, broker):
    """Asked over the socket, as a client would: the broker's state belongs to its thread."""
    sock = dealer(ctx, broker.client_endpoint)
    sock.send_multipart([request_header(id="h", key=KEY, op="health")])
    header = reply_header(recv(sock))
    sock.close()
    return header["health"]


def wait_for_workers(broker, n, ctx=None):
    ctx = ctx or zmq.Context.instance()
    end = time.monotonic() + 3
    while len(health(ctx, broker)["workers"]) < n:
        assert time.monotonic() < end, "workers did not register"
        time.sleep(0.01)


def test_request_is_forwarded_untouched_and_reply_relayed(ctx, broker):
    worker = PeerWorker(ctx, broker.worker_endpoint)
    wait_for_workers(broker, 1)
    client = dealer(ctx, broker.client_endpoint)
    send_request(client, "abc", body=(b"\x01params", b"\x00" * 1000))
    header, body = worker.next_request()
    assert (header["id"], header["op"], header["model"]) == ("abc", "relative_depth", "vits")
    assert header["client"] == "127.0.0.1" and header["timeout_ms"] > 0
    assert body == [b"\x01params", b"\x00" * 1000]
    worker.reply(header, b"depth-bytes")
    frames = recv(client)
    assert reply_header(frames) == {"v": VERSION, "id": "abc", "status": "ok"}
    assert frames[1] == b"depth-bytes"


def test_wrong_key_is_refused_before_any_worker_sees_it(ctx, broker):
    worker = PeerWorker(ctx, broker.worker_endpoint)
    wait_for_workers(broker, 1)
    client = dealer(ctx, broker.client_endpoint)
    for key in ("wrong", None, 12345):
        send_request(client, "x", key=key)
        header = reply_header(recv(client))
        assert header["status"] == "unauthorized" and header["id"] == "x"
        assert KEY not in header["message"]
    assert not worker.has_request()


def test_worker_with_wrong_key_never_gets_requests(ctx, broker):
    worker = PeerWorker(ctx, broker.worker_endpoint, key="bad")
    assert nothing(worker.sock), "a peer without the key is refused at the handshake: not one message either way"
    assert health(ctx, broker)["workers"] == []
    time.sleep(0.7)  # past the start-up grace: the model is not served at all
    client = dealer(ctx, broker.client_endpoint)
    send_request(client)
    assert reply_header(recv(client))["status"] == "unknown_model"


def test_unknown_model_lists_served_models(ctx, broker):
    worker = PeerWorker(ctx, broker.worker_endpoint, models=("vits", "vits-hypersim"))
    wait_for_workers(broker, 1)
    worker.keep_alive(0.7)  # past the start-up grace
    client = dealer(ctx, broker.client_endpoint)
    send_request(client, model="vitl")
    header = reply_header(recv(client))
    assert header["status"] == "unknown_model"
    assert header["details"]["served"] == ["vits", "vits-hypersim"]
    assert "vits-hypersim" in header["message"]


def test_op_and_model_kind_must_agree_and_default_model_is_picked(ctx, broker):
    worker = PeerWorker(ctx, broker.worker_endpoint, models=("vits", "vits-hypersim"))
    wait_for_workers(broker, 1)
    client = dealer(ctx, broker.client_endpoint)
    send_request(client, op="metric_depth", model="vits")
    assert reply_header(recv(client))["status"] == "bad_request"
    send_request(client, "m", op="metric_depth", model=None)
    header, _ = worker.next_request()
    assert header["model"] == "vits-hypersim"


@pytest.mark.parametrize(
    "fields",
    [
        {"v": 99, "id": "a", "op": "health"},
        {"v": VERSION, "id": "a", "key": "wrong", "op": "explode"},
        {"v": VERSION, "id": "a", "key": None, "op": "relative_depth", "model": 7, "timeout_ms": -1},
        {"v": VERSION, "id": ["not", "an", "id"], "key": 1, "op": "relative_depth"},
    ],
)
def test_key_is_judged_before_any_other_field(ctx, broker, fields):
    """A peer without the key learns nothing of the protocol's other rules: only 'unauthorized'."""
    client = dealer(ctx, broker.client_endpoint)
    client.send_multipart([msgpack.packb(fields), b"params", b"image"])
    header = reply_header(recv(client))
    assert header["status"] == "unauthorized"
    assert header["id"] == (fields["id"] if isinstance(fields["id"], str) else None)
    assert "details" not in header and "version" not in header["message"] and "op" not in header["message"]


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([b"\xc1garbage"], "not valid msgpack"),
        ([msgpack.packb([1, 2, 3])], "must be a msgpack map"),
        ([msgpack.packb({"v": 99, "id": "a", "key": KEY, "op": "health"})], "version"),
        ([msgpack.packb({"v": VERSION, "id": "a", "key": KEY, "op": "explode"})], "unknown op"),
        ([msgpack.packb({"v": VERSION, "key": KEY, "op": "health"})], "'id'"),
        ([msgpack.packb({"v": VERSION, "id": "a", "key": KEY, "op": "relative_depth", "model": 7})], "'model'"),
        ([msgpack.packb({"v": VERSION, "id": "a", "key": KEY, "op": "relative_depth", "timeout_ms": -1})], "timeout_ms"),
        ([request_header(id="a", key=KEY, op="relative_depth", model="vits"), b"only one body frame"], "2 body frames"),
        ([b"x" * 10_000], "limit"),
    ],
)
def test_malformed_requests_get_bad_request_and_broker_keeps_serving(ctx, broker, frames, fragment):
    worker = PeerWorker(ctx, broker.worker_endpoint)
    wait_for_workers(broker, 1)
    client = dealer(ctx, broker.client_endpoint)
    client.send_multipart(frames)
    header = reply_header(recv(client))
    assert header["status"] == "bad_request" and fragment in header["message"]
    send_request(client, "good")
    request, _ = worker.next_request()
    worker.reply(request)
    assert reply_header(recv(client))["id"] == "good"


def test_load_is_spread_to_the_least_loaded_worker(ctx, broker):
    a, b = PeerWorker(ctx, broker.worker_endpoint, capacity=2), PeerWorker(ctx, broker.worker_endpoint, capacity=2)
    wait_for_workers(broker, 2)
    client = dealer(ctx, broker.client_endpoint)
    for i in range(4):
        send_request(client, f"r{i}")
    got_a = [a.next_request()[0] for _ in range(2)]
    got_b = [b.next_request()[0] for _ in range(2)]
    assert {h["id"] for h in got_a + got_b} == {"r0", "r1", "r2", "r3"}


def test_capacity_holds_work_in_queue_until_a_reply_frees_a_slot(ctx, broker):
    worker = PeerWorker(ctx, broker.worker_endpoint, capacity=1)
    wait_for_workers(broker, 1)
    client = dealer(ctx, broker.client_endpoint)
    send_request(client, "first")
    send_request(client, "second")
    first, _ = worker.next_request()
    assert not worker.has_request(0.3)
    assert health(ctx, broker)["queued_total"] == 1
    worker.reply(first)
    second, _ = worker.next_request()
    assert second["id"] == "second"


def test_expired_request_gets_timeout_and_never_reaches_a_worker(ctx, broker):
    worker = PeerWorker(ctx, broker.worker_endpoint, capacity=1)
    wait_for_workers(broker, 1)
    client = dealer(ctx, broker.client_endpoint)
    send_request(client, "busy")
    busy, _ = worker.next_request()
    send_request(client, "late", timeout_ms=150)
    header = reply_header(recv(client))
    assert (header["id"], header["status"]) == ("late", "timeout")
    worker.reply(busy)
    assert reply_header(recv(client))["id"] == "busy"
    assert not worker.has_request(0.3)


def test_overload_is_refused_at_once(ctx):
    broker, thread = start_broker(ctx, max_queue=2)
    try:
        worker = PeerWorker(ctx, broker.worker_endpoint, capacity=1)
        wait_for_workers(broker, 1)
        client = dealer(ctx, broker.client_endpoint)
        send_request(client, "run")
        worker.next_request()
        for i in range(2):  # the limit counts requests held at workers too: "run" and "q0" fill it
            send_request(client, f"q{i}")
        header = reply_header(recv(client))
        assert (header["id"], header["status"]) == ("q1", "overloaded")
    finally:
        broker.stop()
        thread.join(10)


def test_dead_worker_requests_are_requeued_once_and_late_reply_dropped(ctx, broker):
    dying = PeerWorker(ctx, broker.worker_endpoint)
    wait_for_workers(broker, 1)
    client = dealer(ctx, broker.client_endpoint)
    send_request(client, "r")
    first, _ = dying.next_request()
    survivor = PeerWorker(ctx, broker.worker_endpoint)
    survivor_header, _ = survivor.next_request(timeout=3)  # dying stopped beating: evicted, request re-queued
    assert survivor_header["id"] == "r" and survivor_header["rid"] != first["rid"]
    dying.reply(first, b"late")  # from a worker the broker has forgotten: dropped
    survivor.reply(survivor_header, b"fresh")
    frames = recv(client)
    assert frames[1] == b"fresh"
    assert nothing(client, 0.5)


def test_request_fails_with_worker_lost_after_second_death(ctx, broker):
    client = dealer(ctx, broker.client_endpoint)
    first = PeerWorker(ctx, broker.worker_endpoint)
    wait_for_workers(broker, 1)
    send_request(client, "r", timeout_ms=20_000)
    first.next_request()
    first.keep_alive(0.1)  # alive after it got the request, then silent: a real loss
    second = PeerWorker(ctx, broker.worker_endpoint)
    second.next_request()
    second.keep_alive(0.1)
    header = reply_header(recv(client, timeout=5))
    assert (header["id"], header["status"]) == ("r", "worker_lost")
    assert nothing(client, 0.5)


def test_a_worker_that_dies_before_any_sign_of_life_does_not_spend_the_requeue(ctx, broker):
    """Two processes killed together: the second one's death is noticed only after the re-queue reached it."""
    client = dealer(ctx, broker.client_endpoint)
    first = PeerWorker(ctx, broker.worker_endpoint)
    wait_for_workers(broker, 1)
    send_request(client, "r", timeout_ms=20_000)
    first.next_request()
    first.keep_alive(0.1)
    doomed = PeerWorker(ctx, broker.worker_endpoint)
    doomed.next_request()  # and silent from then on: it may never have had it
    rescue = PeerWorker(ctx, broker.worker_endpoint)
    header, _ = rescue.next_request(timeout=5)
    rescue.reply(header, b"ok")
    assert recv(client)[1] == b"ok"


def test_draining_worker_gets_no_new_work_but_its_replies_arrive(ctx, broker):
    worker = PeerWorker(ctx, broker.worker_endpoint)
    wait_for_workers(broker, 1)
    client = dealer(ctx, broker.client_endpoint)
    send_request(client, "held")
    held, _ = worker.next_request()
    worker.sock.send_multipart([command("disconnect", reason="draining")])
    time.sleep(0.05)
    send_request(client, "new", timeout_ms=2000)
    assert not worker.has_request(0.2)
    worker.reply(held, b"done")
    assert recv(client)[1] == b"done"
    replacement = PeerWorker(ctx, broker.worker_endpoint)
    header, _ = replacement.next_request()
    assert header["id"] == "new"


def test_unknown_worker_is_asked_to_announce_itself(ctx, broker):
    sock = dealer(ctx, broker.worker_endpoint)
    sock.send_multipart([command("heartbeat")])
    assert msgpack.unpackb(recv(sock)[0])["reason"] == "unknown_worker"


def test_health_reports_workers_and_queues(ctx, broker):
    worker = PeerWorker(ctx, broker.worker_endpoint, models=("vits",), capacity=3)  # noqa: F841 (keeps the socket open)
    wait_for_workers(broker, 1)
    client = dealer(ctx, broker.client_endpoint)
    client.send_multipart([request_header(id="h", key=KEY, op="health")])
    header = reply_header(recv(client))
    health = header["health"]
    assert header["status"] == "ok" and health["models"] == ["vits"]
    (worker,) = health["workers"]
    assert worker["capacity"] == 3 and worker["in_flight"] == 0 and worker["models"] == ["vits"]
    assert {"version", "uptime_s", "queued_total", "queue_limit"} <= set(health)


def test_stop_answers_queued_requests(ctx):
    broker, thread = start_broker(ctx)
    worker = PeerWorker(ctx, broker.worker_endpoint, capacity=1)
    wait_for_workers(broker, 1)
    client = dealer(ctx, broker.client_endpoint)
    send_request(client, "running")
    running, _ = worker.next_request()
    send_request(client, "waiting")
    time.sleep(0.1)
    broker.stop()
    header = reply_header(recv(client))
    assert (header["id"], header["status"]) == ("waiting", "overloaded")
    worker.reply(running, b"finished")
    assert recv(client)[1] == b"finished"
    thread.join(10)
    assert not thread.is_alive()


def test_request_for_a_never_served_model_during_startup_grace_fails_with_unknown_model(ctx, broker):
    """Held while workers may still be registering, then answered unknown_model, not timeout."""
    client = dealer(ctx, broker.client_endpoint)
    send_request(client, "early", model="vitb", timeout_ms=20_000)
    header = reply_header(recv(client, timeout=5))
    assert (header["id"], header["status"]) == ("early", "unknown_model")
