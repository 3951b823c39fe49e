"""What came in first is applied first: replies, then connection events, then deadlines, in both drivers.

A driver does not always get to its sockets at once: a ``stream`` consumer
holds a result for a while, a coroutine blocks the event loop, a loaded host
deschedules the process. Whatever came in meanwhile must then be applied in
the order that keeps the documented promises: a reply that arrived before its
deadline is a result, not a timeout; a connection that dropped before a
request's deadline is a lost connection (resent, or ``reason:
"connection_lost"`` when no retry is left), not a plain timeout; a reply that
arrived before its connection dropped is a result, not a lost request.

Each test makes that moment happen for sure: the consumer holds a result
(``Client``) or blocks the event loop (``AsyncClient``) while the fake server
of test_client.py replies or goes away, checks that what it did reached the
client's sockets (a zmq poll only looks, it takes nothing), and lets the
request's deadline pass when the test is about deadlines. ``retries=0`` makes
the outcomes differ: a timeout and a lost connection are then both final.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import zmq

from test_client import FakeServer, Received, answer, frame, serve  # noqa: F401  (serve: a fixture)
from zdepth import AsyncClient, Client
from zdepth.client.exchanges import Exchange
from zdepth.client.results import DepthResult
from zdepth.errors import DeadlineExceeded

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 1.0  # each attempt's; long enough to connect and answer the first frame on a loaded machine


def first_now_second_on(release: threading.Event | None):
    """A fake server's handler: the first request is answered at once, the second once ``release`` is set
    (None: never), later ones never."""

    def handler(server: FakeServer, rec: Received):
        nth = len(server.requests) - 1
        if nth == 0 or (nth == 1 and release is not None and release.wait(10)):
            return [(rec, answer(rec))]
        return None

    return handler


def wait_readable(sock: zmq.Socket, what: str) -> None:
    """Block until ``sock`` has something to read; a zmq poll only looks, the client still reads it. (On an
    asyncio socket it may use up the wake-up its own task waits for: the AsyncClient tests then pass only if
    the client reads its sockets itself before it judges a deadline or applies a drop, which is the point.)"""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    assert poller.poll(10_000), f"{what} never reached the client"


def only_pending(client: Client | AsyncClient) -> Exchange:
    (exchange,) = client._pipeline.pending()
    return exchange


def pass_deadline(exchange: Exchange) -> None:
    """Block (the thread, and so the event loop) until the attempt's deadline has passed."""
    assert time.monotonic() < exchange.deadline, "the test came too late: what it set up did not beat the deadline"
    while (left := exchange.deadline - time.monotonic()) >= 0:
        time.sleep(left + 0.001)


def is_lost_connection(item: object) -> bool:
    return isinstance(item, DeadlineExceeded) and item.details.get("reason") == "connection_lost"


# ----------------------------------------------------------------------------- Client


def test_sync_a_drop_before_the_deadline_is_a_lost_connection(serve):
    server = serve(first_now_second_on(None))
    with Client(server.address, key="k", timeout=TIMEOUT, retries=0) as client:
        results = client.stream([frame(0), frame(1)], max_in_flight=2, return_exceptions=True)
        assert isinstance(next(results), DepthResult)
        second = only_pending(client)
        server.close()
        wait_readable(client._monitors[0], "the disconnection")
        pass_deadline(second)
        item = next(results)
    assert is_lost_connection(item), repr(item)


def test_sync_a_reply_before_the_deadline_is_a_result(serve):
    release = threading.Event()
    server = serve(first_now_second_on(release))
    with Client(server.address, key="k", timeout=TIMEOUT, retries=0) as client:
        results = client.stream([frame(0), frame(1)], max_in_flight=2, return_exceptions=True)
        assert isinstance(next(results), DepthResult)
        second = only_pending(client)
        release.set()
        wait_readable(client._sockets[0], "the second reply")
        pass_deadline(second)
        item = next(results)
    assert isinstance(item, DepthResult) and item.index == 1, repr(item)


def test_sync_a_reply_before_the_drop_is_a_result(serve):
    release = threading.Event()
    server = serve(first_now_second_on(release))
    with Client(server.address, key="k", timeout=30, retries=0) as client:
        results = client.stream([frame(0), frame(1), frame(2)], max_in_flight=2, return_exceptions=True)
        assert isinstance(next(results), DepthResult)
        release.set()
        wait_readable(client._sockets[0], "the second reply")
        server.close()
        wait_readable(client._monitors[0], "the disconnection")
        item = next(results)  # sends the third frame first: the connection events are read then
        results.close()
    assert isinstance(item, DepthResult) and item.index == 1, repr(item)


# ----------------------------------------------------------------------------- AsyncClient


def test_async_a_drop_before_the_deadline_is_a_lost_connection(serve):
    server = serve(first_now_second_on(None))

    async def main():
        async with (
            AsyncClient(server.address, key="k", timeout=TIMEOUT, retries=0) as client,
            contextlib.aclosing(client.stream([frame(0), frame(1)], max_in_flight=2, return_exceptions=True)) as results,
        ):
            assert isinstance(await anext(results), DepthResult)
            second = only_pending(client)  # from here the event loop stays blocked until the deadline has passed
            server.close()
            wait_readable(client._monitors[0], "the disconnection")
            pass_deadline(second)
            return await anext(results)

    item = asyncio.run(main())
    assert is_lost_connection(item), repr(item)


def test_async_a_reply_before_the_deadline_is_a_result(serve):
    release = threading.Event()
    server = serve(first_now_second_on(release))

    async def main():
        async with (
            AsyncClient(server.address, key="k", timeout=TIMEOUT, retries=0) as client,
            contextlib.aclosing(client.stream([frame(0), frame(1)], max_in_flight=2, return_exceptions=True)) as results,
        ):
            assert isinstance(await anext(results), DepthResult)
            second = only_pending(client)
            release.set()
            wait_readable(client._sockets[0], "the second reply")
            pass_deadline(second)
            return await anext(results)

    item = asyncio.run(main())
    assert isinstance(item, DepthResult) and item.index == 1, repr(item)


def test_async_a_reply_before_the_drop_is_a_result(serve):
    release = threading.Event()
    server = serve(first_now_second_on(release))

    async def main():
        async with (
            AsyncClient(server.address, key="k", timeout=30, retries=0) as client,
            contextlib.aclosing(
                client.stream([frame(0), frame(1), frame(2)], max_in_flight=2, return_exceptions=True)
            ) as results,
        ):
            assert isinstance(await anext(results), DepthResult)
            release.set()
            wait_readable(client._sockets[0], "the second reply")
            server.close()
            wait_readable(client._monitors[0], "the disconnection")
            return await anext(results)  # sends the third frame first: the connection events are read then

    item = asyncio.run(main())
    assert isinstance(item, DepthResult) and item.index == 1, repr(item)
