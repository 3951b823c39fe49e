"""The broker's promises on bad days, over a real broker process and real sockets.

Each test is one fault a lab meets (hosts frozen or killed together, a slot
freed by a slow batch, a client that stops reading, a stranger on the LAN, a
wrong key, a drain, a stuck GPU, one greedy client) and pins the behaviour
PROTOCOL.md promises. tests/test_broker_core.py proves the same rules for
every interleaving on the sans-IO core; these prove the wiring.
"""

from __future__ import annotations

import collections
import signal
import time

import msgpack
import pytest
import zmq

from peers import PeerWorker, dealer, health, recv_reply, send_request, start_broker, wait_until
from zdepth.broker import Broker
from zdepth.config import BrokerConfig

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    PeerWorker.stop_all()
    context.destroy(linger=0)


@pytest.fixture
def broker(tmp_path):
    process = start_broker(tmp_path)
    yield process
    process.stop(signal.SIGKILL)


def workers_ready(ctx, broker, n):
    wait_until(lambda: len([w for w in health(ctx, broker)["workers"] if w["state"] == "ready"]) == n, what=f"{n} workers ready")


def test_two_of_three_workers_freeze_together_and_their_requests_go_to_the_third(ctx, broker):
    frozen = [PeerWorker(ctx, broker.workers, name=f"frozen{i}", capacity=4, reply_after=None) for i in range(2)]
    workers_ready(ctx, broker, 2)
    client = dealer(ctx, broker.clients)
    for i in range(4):
        send_request(client, f"r{i}", timeout_ms=20_000)
    wait_until(lambda: sum(len(w.received) for w in frozen) == 4, what="four requests at the frozen pair")
    PeerWorker(ctx, broker.workers, name="live", capacity=8)
    workers_ready(ctx, broker, 3)
    for worker in frozen:
        worker.frozen = True  # a host with two GPUs suspended: both stop at once
    replies = [recv_reply(client, timeout=10)[0] for _ in range(4)]
    assert sorted(r["id"] for r in replies) == [f"r{i}" for i in range(4)]
    assert {r["status"] for r in replies} == {"ok"}, replies
    assert {r["worker"] for r in replies} == {"live"}


def test_a_send_to_a_vanished_worker_costs_the_request_nothing(ctx, tmp_path):
    broker = start_broker(tmp_path, interval_s=1.0)  # heartbeats rare: the broker learns of the vanished peer by sending to it
    try:
        loaded = PeerWorker(ctx, broker.workers, name="loaded", capacity=2, reply_after=None, interval_s=1.0)
        gone = PeerWorker(ctx, broker.workers, name="gone", capacity=2, reply_after=None, interval_s=1.0)
        workers_ready(ctx, broker, 2)
        client = dealer(ctx, broker.clients)
        send_request(client, "first", timeout_ms=20_000)
        wait_until(lambda: len(loaded.received) + len(gone.received) == 1, what="the first dispatch")
        if gone.received:  # make "gone" the loaded one, so the next request goes to the other: the vanished peer
            loaded, gone = gone, loaded
        gone.vanish()
        time.sleep(0.1)
        send_request(client, "r", timeout_ms=20_000)  # goes to the emptier worker, which vanished: the send fails
        wait_until(lambda: any(h["id"] == "r" for h in loaded.received), what="r re-queued to the live worker")
        loaded.vanish()  # ... which dies holding it: that is r's one real loss
        rescue = PeerWorker(ctx, broker.workers, name="rescue", capacity=2, interval_s=1.0)
        replies = {}
        for _ in range(2):
            header, _ = recv_reply(client, timeout=10)
            replies[header["id"]] = header
        assert replies["r"]["status"] == "ok" and replies["r"]["worker"] == "rescue", replies
        assert replies["first"]["status"] == "ok", replies
        rescue.stop()
    finally:
        broker.stop(signal.SIGKILL)


def test_a_slot_freed_by_an_expired_request_is_used_at_once(ctx, broker):
    worker = PeerWorker(ctx, broker.workers, name="slow", capacity=1, reply_after=None)
    workers_ready(ctx, broker, 1)
    client = dealer(ctx, broker.clients)
    send_request(client, "slow", timeout_ms=500)
    wait_until(lambda: len(worker.received) == 1, what="the slow request at the worker")
    worker.reply_after = 0.0  # what it gets from now on it answers (the slow one stays unanswered)
    send_request(client, "waiting", timeout_ms=8000)
    header, _ = recv_reply(client)
    assert (header["id"], header["status"]) == ("slow", "timeout")
    wait_until(lambda: len(worker.received) == 2, timeout=3.0, what="the waiting request dispatched when the slot freed (not after its 8 s deadline)")
    header, _ = recv_reply(client)
    assert (header["id"], header["status"]) == ("waiting", "ok")


def test_a_client_that_never_reads_holds_bounded_broker_memory(ctx, broker):
    PeerWorker(ctx, broker.workers, name="big", capacity=8, reply_bytes=1 << 20)
    workers_ready(ctx, broker, 1)
    before = broker.rss_mb()
    lazy = dealer(ctx, broker.clients)
    lazy.setsockopt(zmq.RCVHWM, 1)  # and its own side buffers as little as ZeroMQ allows
    lazy.setsockopt(zmq.RCVBUF, 64 * 1024)
    for i in range(600):
        send_request(lazy, f"lazy{i}", timeout_ms=30_000)
        if i % 50 == 49:
            time.sleep(0.1)
    time.sleep(2.0)
    grown = broker.rss_mb() - before
    # 64 unread replies of 1 MiB at most (the per-client high-water mark), plus the kernel's and ZeroMQ's buffers.
    assert grown < 160, f"broker RSS grew {grown:.0f} MB for a client that does not read"
    other = dealer(ctx, broker.clients)
    send_request(other, "other")
    header, frames = recv_reply(other)
    assert header["status"] == "ok" and len(frames[0]) == 1 << 20
    lazy.close()


def test_a_stranger_without_the_key_cannot_make_the_broker_hold_a_large_message(ctx, broker):
    PeerWorker(ctx, broker.workers, name="w")
    workers_ready(ctx, broker, 1)
    before = broker.rss_mb()
    stranger = dealer(ctx, broker.clients, key=None)
    stranger.setsockopt(zmq.SNDTIMEO, 5000)
    frame = zmq.Frame(b"\0" * (40 << 20))
    try:
        stranger.send_multipart([b"header", *([frame] * 10)], copy=False)  # 400 MiB in frames under the per-frame limit
    except zmq.Again:
        pass  # its connection was already refused at the handshake, and it waits to reconnect: nothing was sent
    time.sleep(3.0)
    grown = broker.rss_mb() - before
    assert grown < 50, f"broker RSS grew {grown:.0f} MB from a peer without the key"
    assert not stranger.poll(100), "a peer without the key gets nothing back"
    client = dealer(ctx, broker.clients)
    send_request(client, "still-serving")
    assert recv_reply(client)[0]["status"] == "ok"
    stranger.close()


def test_the_key_is_judged_before_anything_else(ctx, broker):
    client = dealer(ctx, broker.clients)
    client.send_multipart([msgpack.packb({"v": 99, "id": "x", "key": "wrong", "op": "explode", "timeout_ms": -5}), b"p"])
    header, _ = recv_reply(client)
    assert (header["id"], header["status"]) == ("x", "unauthorized")
    for word in ("version", "op", "timeout", "frames"):
        assert word not in header["message"]


def test_a_request_that_arrives_while_the_broker_drains_is_answered(ctx, broker):
    worker = PeerWorker(ctx, broker.workers, name="holding", capacity=2, reply_after=None)
    workers_ready(ctx, broker, 1)
    client = dealer(ctx, broker.clients)
    send_request(client, "held", timeout_ms=20_000)
    wait_until(lambda: len(worker.received) == 1, what="a request in flight")
    broker.popen.send_signal(signal.SIGTERM)  # drain: waits up to 5 s for "held"
    wait_until(lambda: "broker stopping" in broker.output(), what="the drain to begin")
    send_request(client, "late", timeout_ms=20_000)
    header, _ = recv_reply(client)
    assert (header["id"], header["status"]) == ("late", "overloaded") and "shutting down" in header["message"]
    worker.reply_after = 0.0
    worker._held.append((0.0, worker.received[0]))  # it finishes what it held
    header, _ = recv_reply(client)
    assert (header["id"], header["status"]) == ("held", "ok")
    assert broker.popen.wait(10) == 0


def test_a_stuck_worker_is_taken_out_of_rotation_until_it_answers(ctx, broker):
    stuck = PeerWorker(ctx, broker.workers, name="stuck", capacity=1, reply_after=None)
    workers_ready(ctx, broker, 1)
    good = PeerWorker(ctx, broker.workers, name="good", capacity=1, reply_after=0.05)
    workers_ready(ctx, broker, 2)
    client = dealer(ctx, broker.clients)
    statuses = collections.Counter()
    for i in range(12):
        send_request(client, f"r{i}", timeout_ms=300)
        statuses[recv_reply(client, timeout=5)[0]["status"]] += 1
    assert len(stuck.received) <= 2, f"the stuck worker got {len(stuck.received)} requests"
    state = {w["name"]: w for w in health(ctx, broker)["workers"]}
    assert state["stuck"]["state"] == "unhealthy" and state["stuck"]["unhealthy"] is True
    assert state["good"]["state"] == "ready"
    assert statuses["ok"] >= 10, statuses
    stuck.reply_after = 0.0  # it recovers: its next reply (late, dropped) puts it back
    stuck._held.extend((0.0, h) for h in stuck.received)
    wait_until(lambda: {w["name"]: w["state"] for w in health(ctx, broker)["workers"]}["stuck"] == "ready", what="the stuck worker back")
    good.stop()


def test_one_clients_backlog_does_not_starve_another(ctx, broker):
    PeerWorker(ctx, broker.workers, name="w", capacity=1, reply_after=0.02)
    workers_ready(ctx, broker, 1)
    greedy = dealer(ctx, broker.clients)
    for i in range(150):
        send_request(greedy, f"g{i}", timeout_ms=60_000)
    time.sleep(0.2)
    interactive = dealer(ctx, broker.clients)
    started = time.monotonic()
    send_request(interactive, "mine", timeout_ms=60_000)
    header, _ = recv_reply(interactive, timeout=10)
    waited = time.monotonic() - started
    assert header["status"] == "ok"
    assert waited < 1.0, f"the single request waited {waited:.2f} s behind another client's backlog"


def test_work_that_cannot_finish_before_its_deadline_never_reaches_a_busy_worker(ctx, broker):
    worker = PeerWorker(ctx, broker.workers, name="slow", capacity=1, reply_after=0.6)
    workers_ready(ctx, broker, 1)
    client = dealer(ctx, broker.clients)
    send_request(client, "warm", timeout_ms=5000)  # teaches the broker this worker's time per request
    assert recv_reply(client)[0]["status"] == "ok"
    send_request(client, "busy", timeout_ms=5000)
    send_request(client, "hopeless", timeout_ms=300)  # 0.3 s left, the worker needs 0.6 s and is busy
    header, _ = recv_reply(client)
    assert (header["id"], header["status"]) == ("hopeless", "timeout") and "ms a request" in header["message"]
    assert recv_reply(client)[0]["id"] == "busy"
    assert [h["id"] for h in worker.received] == ["warm", "busy"]


def test_a_broker_whose_bind_fails_closes_everything(ctx):
    with Broker(BrokerConfig(clients="tcp://127.0.0.1:*", workers="tcp://127.0.0.1:*")) as first:
        first.bind()
        started = time.monotonic()
        with pytest.raises(zmq.ZMQError):
            with Broker(BrokerConfig(clients=first.client_endpoint, workers="tcp://127.0.0.1:*")) as second:
                second.bind()
        assert second._context.closed and time.monotonic() - started < 5
