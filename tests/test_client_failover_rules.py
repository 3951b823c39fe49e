"""The failover decisions of the client's sans-IO pipeline, fed the events and replies a driver would feed it.

tests/test_failover.py shows them over real broker processes; here each rule
is pinned on its own, with the clock in the test's hands: which broker a send
goes to, when a broker counts as failed (its connection dropped or never came
up, or a request to it expired while nothing at all was heard from it), what
happens to requests out on it, and that the client does not move back.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zmq

from zdepth import protocol
from zdepth.client.calls import Call
from zdepth.client.links import FIRST_CHOICE_GRACE_S
from zdepth.client.pipeline import Pipeline
from zdepth.client.replies import finish_depth
from zdepth.errors import BrokerUnreachable, DeadlineExceeded, Unauthorized
from zdepth.protocol import codec

A, B = "tcp://a:5555", "tcp://b:5555"
UP, DOWN, REFUSED = zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_FAILED_AUTH


def pipeline(*, timeout: float = 1.0, retries: int = 1, now: float = 0.0) -> Pipeline:
    """Two brokers, both connected at ``now`` (the fresh client's first-choice wait is over by then)."""
    pipe = Pipeline(addresses=[A, B], key=None, timeout=timeout, retries=retries)
    for index, link in enumerate(pipe.links):
        link.reset(now - FIRST_CHOICE_GRACE_S)
        pipe.link_event(index, UP, 0, now)
    return pipe


def request(now: float) -> Call:
    return Call(op=protocol.OP_RELATIVE, model="vits", body=(b"params", b"image"), finish=finish_depth, created=now)


def send(pipe: Pipeline, now: float):
    """Open a request and hand its attempt to the broker the pipeline routes it to; returns it and that broker."""
    exchange = pipe.open(request(now), now)
    return exchange, flush(pipe, exchange, now)


def flush(pipe: Pipeline, exchange, now: float) -> int | None:
    assert exchange in pipe.unsent()
    target = pipe.route(exchange, now)
    if target is not None:
        pipe.message(exchange, now)
        pipe.sent(exchange, now, target)
    return target


def reply(exchange, wire_id: str | None = None) -> list[bytes]:
    depth = np.ones((2, 3), np.float32)
    descs, buffers = codec.array_frames({"depth": depth})
    return [protocol.reply_header(wire_id or exchange.id, arrays=descs, model="vits", worker="w", min=1.0, max=1.0), *(b.tobytes() for b in buffers)]


def test_requests_go_to_the_first_broker_and_a_result_says_which_relayed_it():
    pipe = pipeline()
    exchange, target = send(pipe, 0.0)
    assert target == 0
    assert pipe.receive(reply(exchange), 0.1, 0) is exchange
    assert exchange.result().broker == A


def test_a_dropped_connection_resends_what_it_held_to_the_other_broker_spending_a_retry():
    pipe = pipeline()
    out, _ = send(pipe, 0.0)
    first_id = out.id
    action, failed = pipe.link_event(0, DOWN, 0, 0.2)
    assert action is None and failed == []
    assert out.retries_left == 0 and out.attempts == 2 and out.id != first_id
    assert flush(pipe, out, 0.2) == 1  # the resend goes to the broker that is up
    assert out.deadline == pytest.approx(1.2)  # a whole attempt, within the bound of 2 s from the call
    pipe.receive(reply(out), 0.3, 1)
    assert out.result().broker == B


def test_with_no_retry_left_a_dropped_connection_fails_at_once_naming_the_broker():
    pipe = pipeline(retries=0)
    out, _ = send(pipe, 0.0)
    waiting = pipe.open(request(0.1), 0.1)  # not sent yet: it just goes to the other broker
    _, failed = pipe.link_event(0, DOWN, 0, 0.2)
    assert failed == [out]
    with pytest.raises(DeadlineExceeded, match=f"connection to {A} dropped") as info:
        out.result()
    assert info.value.details["reason"] == "connection_lost"
    assert flush(pipe, waiting, 0.2) == 1 and waiting.attempts == 1


def test_a_request_that_expires_while_its_broker_answers_others_is_retried_on_the_same_broker():
    # A slow worker, not a dead broker: replies to other requests keep coming.
    pipe = pipeline()
    slow, _ = send(pipe, 0.0)
    quick, _ = send(pipe, 0.5)
    pipe.receive(reply(quick), 0.6, 0)
    assert pipe.expire(1.0) == []
    assert slow.attempts == 2 and not pipe.links[0].silent
    assert flush(pipe, slow, 1.0) == 0


def test_a_request_that_expires_with_nothing_heard_from_its_broker_moves_on_and_the_client_stays_moved(caplog):
    pipe = pipeline()
    out, _ = send(pipe, 0.0)
    pipe.receive(reply(out), 0.1, 0)
    out2, _ = send(pipe, 0.2)  # the broker freezes: nothing more from it
    with caplog.at_level(logging.WARNING, logger="zdepth.client.pipeline"):
        assert pipe.expire(1.2) == []
    assert pipe.links[0].silent and "nothing heard from the broker at " + A in caplog.text
    assert flush(pipe, out2, 1.2) == 1  # the retry goes elsewhere
    # A late reply from the frozen broker still counts (a result), and clears its silence; the client stays on B.
    pipe.receive(reply(out2, next(iter(out2.ids))), 1.3, 0)
    assert out2.result().broker == A and not pipe.links[0].silent
    _, target = send(pipe, 1.4)
    assert target == 1


def test_the_client_does_not_move_back_when_the_first_broker_returns():
    pipe = pipeline()
    pipe.link_event(0, DOWN, 0, 0.0)
    _, target = send(pipe, 0.1)
    assert target == 1
    pipe.link_event(0, UP, 0, 0.5)  # restarted and reconnected
    _, target = send(pipe, 0.6)
    assert target == 1
    pipe.link_event(1, DOWN, 0, 0.7)  # only when the one in use fails
    _, target = send(pipe, 0.8)
    assert target == 0


def test_a_fresh_client_gives_the_first_broker_a_moment_to_connect():
    pipe = Pipeline(addresses=[A, B], key=None, timeout=5.0, retries=0)
    for link in pipe.links:
        link.reset(0.0)
    pipe.link_event(1, UP, 0, 0.01)  # the second connects first
    exchange = pipe.open(request(0.02), 0.02)
    assert pipe.route(exchange, 0.02) is None
    assert pipe.next_deadline() == pytest.approx(FIRST_CHOICE_GRACE_S)  # the driver wakes when the wait ends
    pipe.link_event(0, UP, 0, 0.05)
    assert pipe.route(exchange, 0.05) == 0
    late = Pipeline(addresses=[A, B], key=None, timeout=5.0, retries=0)
    for link in late.links:
        link.reset(0.0)
    late.link_event(1, UP, 0, 0.01)
    exchange = late.open(request(0.02), 0.02)
    assert late.route(exchange, FIRST_CHOICE_GRACE_S + 0.01) == 1  # the first never came: the second it is


def test_a_broker_that_refuses_the_key_is_passed_over_unless_every_one_does(caplog):
    pipe = pipeline()
    waiting = pipe.open(request(0.0), 0.0)
    pinned = pipe.open(request(0.0), 0.0, pin=0)
    pipe.link_event(0, DOWN, 0, 0.0)
    with caplog.at_level(logging.WARNING, logger="zdepth.client.pipeline"):
        _, failed = pipe.link_event(0, REFUSED, 400, 0.1)
    assert failed == [pinned] and isinstance(pinned.error, Unauthorized)
    assert "using the other brokers" in caplog.text
    assert pipe.route(waiting, 0.1) == 1 and not waiting.done
    assert pipe.refused(0.2) == []  # another broker is up: the refusing one is tried again only now and then
    assert pipe.refused(10.0) == [0]
    pipe.link_event(1, DOWN, 0, 0.3)
    _, failed = pipe.link_event(1, REFUSED, 400, 0.3)
    assert failed == [waiting] and isinstance(waiting.error, Unauthorized)


def test_no_broker_connected_fails_by_min_timeout_5_naming_each():
    pipe = pipeline(timeout=2.0, retries=3)
    pipe.link_event(0, DOWN, 0, 0.0)
    exchange = pipe.open(request(0.5), 0.5)
    pipe.link_event(1, DOWN, 0, 1.0)  # since when none is up
    assert pipe.next_deadline() == pytest.approx(2.5)  # its first attempt's timeout (it never left)
    assert pipe.expire(2.5) == [] and exchange.attempts == 2
    assert pipe.next_deadline() == pytest.approx(3.0)  # min(timeout, 5) after the last connection went
    assert pipe.expire(2.9) == []
    assert pipe.expire(3.0) == [exchange]
    with pytest.raises(BrokerUnreachable, match="any of the 2 brokers") as info:
        exchange.result()
    assert A in str(info.value) and B in str(info.value) and info.value.details["addresses"] == [A, B]


def test_one_broker_keeps_its_own_rules_and_messages():
    pipe = Pipeline(addresses=[A], key=None, timeout=1.0, retries=0)
    pipe.links[0].reset(0.0)
    exchange = pipe.open(request(0.0), 0.0)
    assert pipe.route(exchange, 0.0) == 0  # sent whether or not a connection is known to be up
    assert pipe.expire(1.0) == [exchange]
    with pytest.raises(BrokerUnreachable, match=f"cannot reach the broker at {A}: no connection"):
        exchange.result()
