"""A real broker process, and workers and clients reduced to the protocol, for fault tests.

The fakes live in ``zdepth.testing`` (the benchmarks use them too); this module
gives them the tests' key, environment and failure style: the broker runs as
its own process with this checkout on its path (any BrokerConfig field can be
set), the peers speak PROTOCOL.md over real loopback sockets from threads of
the test process, and a reply that does not come fails the test.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import zmq

from procs import child_env
from zdepth import testing
from zdepth.testing import BrokerProcess, FakeWorker

__all__ = ["KEY", "BrokerProcess", "PeerWorker", "dealer", "health", "recv_reply", "send_request", "start_broker", "wait_until"]

KEY = "fault-key"


def start_broker(tmp_path: Path, *, interval_s: float = 0.5, liveness: int = 4, **fields: Any) -> BrokerProcess:
    """This checkout's broker with the tests' key, in its own process; ``fields`` are BrokerConfig fields."""
    return testing.start_broker(tmp_path, key=KEY, env=child_env(), interval_s=interval_s, liveness=liveness, **fields)


def dealer(ctx: zmq.Context, endpoint: str, *, key: str | None = KEY) -> zmq.Socket:
    """A raw DEALER that proves ``key`` at the handshake (None: proves nothing, as a stranger)."""
    return testing.dealer(ctx, endpoint, key=key)


def send_request(sock: zmq.Socket, request_id: str, *, key: str = KEY, model: str = "vits", timeout_ms: float | None = None, body=(b"params", b"image")) -> None:
    testing.send_request(sock, request_id, key=key, model=model, timeout_ms=timeout_ms, body=body)


def recv_reply(sock: zmq.Socket, timeout: float = 5.0) -> tuple[dict[str, Any], list[bytes]]:
    """The next reply (header map, body frames); none within ``timeout`` seconds fails the test."""
    got = testing.recv_reply(sock, timeout)
    if got is None:
        raise AssertionError(f"no reply within {timeout} s")
    return got


def health(ctx: zmq.Context, broker: BrokerProcess) -> dict[str, Any]:
    got = testing.broker_health(ctx, broker.clients, key=KEY)
    assert got is not None, f"the broker at {broker.clients} did not answer health"
    return got


class PeerWorker(FakeWorker):
    """A FakeWorker with the tests' key that answers each request on its own, ``reply_after`` seconds
    after it arrived (None: never, a stuck GPU; a change applies to requests that arrive after it):
    no batches, no deadlines, and no READY again when the broker forgets it.
    """

    running: list["PeerWorker"] = []  # stopped by the tests' context fixture before the context goes

    def __init__(self, ctx: zmq.Context, endpoint: str, *, name: str, models=("vits",), capacity: int = 2, reply_after: float | None = 0.0, reply_bytes: int = 16, interval_s: float = 0.2) -> None:
        self.reply_after = reply_after
        PeerWorker.running.append(self)
        super().__init__(ctx, endpoint, key=KEY, name=name, models=models, capacity=capacity, reply_bytes=reply_bytes, interval_s=interval_s, rejoin=False)

    def _arrived(self, header: dict[str, Any], now: float) -> None:
        if self.reply_after is not None:
            self._held.append((now + self.reply_after, header))  # (when it is due, REQUEST header); tests may add to it

    def _work(self, sock: zmq.Socket, now: float) -> int:
        for item in [item for item in self._held if item[0] <= now]:
            self._held.remove(item)
            self._reply(sock, item[1])
        return 5

    @classmethod
    def stop_all(cls) -> None:
        while cls.running:
            cls.running.pop().stop()


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 20 ms; not true within ``timeout`` seconds fails the test, naming ``what``."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
