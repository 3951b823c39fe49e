"""The client's time bound: a call never outlives ``timeout * (retries + 1)``, and only what expired is resent.

The server here is a ROUTER on a real loopback port that answers each request
after a delay it chooses per request, or never: enough to hold some requests
while others come and go, which is where a client that resends everything on
every expiry overran its bound and doubled the servers' work.
"""

from __future__ import annotations

import asyncio
import heapq
import threading
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
import pytest
import zmq

from test_client import Received, answer, error_reply, fake_depth, frame
from zdepth import AsyncClient, Client, protocol
from zdepth.errors import DeadlineExceeded
from zdepth.protocol import codec

pytestmark = pytest.mark.timeout(60)

SLACK = 0.25  # scheduling on a busy 2-core machine; the bound itself is what is checked

# A plan maps a received request (and how many times its image was seen) to a delay, or None: never answer.
Plan = Callable[[Received, int], "float | None"]


class DelayServer:
    """A ROUTER that answers each request after ``plan(request, nth)`` seconds (None: never), from one thread."""

    def __init__(self, plan: Plan, reply: Callable[[Received, int], list[bytes]] | None = None) -> None:
        self.plan = plan
        self.reply = reply or (lambda rec, nth: answer(rec))
        self.requests: list[tuple[float, Received]] = []
        self.seen: Counter[bytes] = Counter()
        self.errors: list[BaseException] = []
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self._socket.bind_to_random_port('tcp://127.0.0.1')}"
        self._due: list[tuple[float, int, list[bytes]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def receipts(self, image: np.ndarray) -> int:
        return self.seen[image.tobytes()]

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        serial = 0
        while not self._stop.is_set():
            now = time.monotonic()
            while self._due and self._due[0][0] <= now:
                self._socket.send_multipart(heapq.heappop(self._due)[2])
            wait = 20 if not self._due else max(0, min(20, int((self._due[0][0] - now) * 1000)))
            if not poller.poll(wait):
                continue
            identity, *frames = self._socket.recv_multipart()
            try:
                header = protocol.unpack_map(frames[0], what="header")
                parsed = protocol.parse_request_header(frames[0])
                params = image = None
                if parsed.op in protocol.MODEL_OPS:
                    params = codec.parse_params(parsed.op, frames[1])
                    image = codec.decode_image_frame(params.image, frames[2])
                rec = Received(identity, header, params, image, frames)
                key = bytes(frames[2]) if len(frames) > 2 else b"health"
                self.seen[key] += 1
                self.requests.append((time.monotonic(), rec))
                delay = self.plan(rec, self.seen[key])
                if delay is not None:
                    serial += 1
                    heapq.heappush(self._due, (time.monotonic() + delay, serial, [identity, *self.reply(rec, self.seen[key])]))
            except Exception as exc:  # reported at teardown
                self.errors.append(exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close(linger=0)
        self._context.term()
        if self.errors:
            raise AssertionError(f"the test server failed: {self.errors!r}")


@pytest.fixture
def delay_server():
    servers: list[DelayServer] = []

    def start(plan: Plan, reply: Callable[[Received, int], list[bytes]] | None = None) -> DelayServer:
        servers.append(DelayServer(plan, reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


A, B, C = frame(100), frame(101), frame(102)


def plan_abc(rec: Received, nth: int) -> float | None:
    """A and B are never answered; C is answered 0.3 s after each receipt."""
    return 0.3 if rec.frames[2] == C.tobytes() else None


def test_async_calls_keep_their_bound_and_only_expired_requests_are_resent(delay_server):
    # timeout 0.5, retries 1: no call may take longer than 1.0 s. A expires first, while B and C are out.
    server = delay_server(plan_abc)
    elapsed: dict[str, float] = {}
    outcome: dict[str, Any] = {}

    async def timed(name: str, delay: float, client: AsyncClient, image: np.ndarray) -> None:
        await asyncio.sleep(delay)
        start = time.monotonic()
        try:
            outcome[name] = await client.relative_depth(image)
        except DeadlineExceeded as exc:
            outcome[name] = exc
        elapsed[name] = time.monotonic() - start

    async def main() -> None:
        async with AsyncClient(server.address, timeout=0.5, retries=1) as client:
            await asyncio.gather(timed("A", 0.0, client, A), timed("B", 0.2, client, B), timed("C", 0.4, client, C))

    asyncio.run(main())
    bound = 0.5 * 2
    assert isinstance(outcome["A"], DeadlineExceeded) and isinstance(outcome["B"], DeadlineExceeded)
    assert max(elapsed["A"], elapsed["B"]) <= bound + SLACK, elapsed
    assert elapsed["B"] >= bound - 0.05, elapsed  # B was given its whole bound, and a retry
    np.testing.assert_array_equal(outcome["C"].depth, fake_depth(C))
    assert elapsed["C"] < 0.5, elapsed  # its reply came back on the socket it was sent on
    # One send and one retry for each expired request; nothing that was answered in time is sent twice.
    assert (server.receipts(A), server.receipts(B), server.receipts(C)) == (2, 2, 1)


def test_stream_keeps_each_frames_bound_and_resends_only_what_expired(delay_server):
    server = delay_server(plan_abc)
    submitted: dict[int, float] = {}

    def source():
        for index, image in enumerate((A, B, C)):
            submitted[index] = time.monotonic()
            yield image
            time.sleep(0.2)

    yielded: dict[int, float] = {}
    with Client(server.address, timeout=0.5, retries=1) as client:
        items = []
        for item in client.stream(source(), max_in_flight=3, return_exceptions=True):
            items.append(item)
            yielded[len(items) - 1] = time.monotonic()
    assert isinstance(items[0], DeadlineExceeded) and isinstance(items[1], DeadlineExceeded)
    for index in (0, 1):  # results come in order, so a failure is yielded as soon as it is settled
        assert yielded[index] - submitted[index] <= 1.0 + SLACK, (index, yielded[index] - submitted[index])
        assert items[index].details["attempts"] == 2
    np.testing.assert_array_equal(items[2].depth, fake_depth(C))
    assert (server.receipts(A), server.receipts(B), server.receipts(C)) == (2, 2, 1)


def test_a_late_reply_to_the_first_attempt_still_counts(delay_server):
    # The first attempt is answered 0.65 s after it was sent, after its 0.5 s expired and the retry went out.
    # The retry is never answered. The call returns that late first answer, within the bound.
    server = delay_server(lambda rec, nth: 0.65 if nth == 1 else None)
    start = time.monotonic()
    with Client(server.address, timeout=0.5, retries=1) as client:
        result = client.relative_depth(A)
    assert 0.6 <= time.monotonic() - start <= 1.0 + SLACK
    np.testing.assert_array_equal(result.depth, fake_depth(A))
    assert server.receipts(A) == 2


def test_a_timeout_reply_to_a_superseded_attempt_does_not_fail_the_retry(delay_server):
    # Like a broker whose copy of attempt 1 reached its deadline: it answers "timeout", after the client
    # has already retried. The retry's own answer is what the caller gets.
    def reply(rec: Received, nth: int) -> list[bytes]:
        return error_reply(rec, "timeout", "deadline passed in the queue") if nth == 1 else answer(rec)

    # Attempt 1 expires at 1.0 s and its "timeout" comes at 1.05 s; the retry's answer at about 1.2 s,
    # well inside the 2.0 s bound even when a busy machine wakes the client late.
    server = delay_server(lambda rec, nth: 1.05 if nth == 1 else 0.2, reply)

    async def main():
        async with AsyncClient(server.address, timeout=1.0, retries=1) as client:
            return await client.relative_depth(B)

    result = asyncio.run(main())
    np.testing.assert_array_equal(result.depth, fake_depth(B))
    assert server.receipts(B) == 2


def test_each_attempt_tells_the_server_how_long_is_left(delay_server):
    server = delay_server(lambda rec, nth: None)
    with Client(server.address, timeout=0.4, retries=2) as client:
        with pytest.raises(DeadlineExceeded) as info:
            client.relative_depth(A)
    assert info.value.details["attempts"] == 3
    times = [t for t, _ in server.requests]
    budgets = [rec.header["timeout_ms"] for _, rec in server.requests]
    assert len(times) == 3 and all(350 <= b <= 400 for b in budgets), budgets
    ids = [rec.id for _, rec in server.requests]
    assert len(set(ids)) == 3  # each attempt has its own id, so a reply says which attempt it answers
    assert len({rec.identity for _, rec in server.requests}) == 1  # and all go out on the one connection
    assert 0.75 <= times[2] - times[0] <= 0.8 + SLACK
