"""Calls in flight: an ``Exchange`` per call (its attempts and outcome), and the state of a ``stream``.

A call becomes an exchange when the pipeline opens it; each send of it is an
attempt with a wire id of its own (``new_attempt_id``), so a late reply to an
earlier attempt is told from the current one. Sans-IO.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator

from zdepth.client.calls import Call

if TYPE_CHECKING:
    from zdepth.client.pipeline import Pipeline

log = logging.getLogger(__name__)


def new_attempt_id() -> str:
    """16 hex characters of a random uuid4: unique enough to match replies, short on the wire."""
    return uuid.uuid4().hex[:16]


class Exchange:
    """A call in flight, until it is settled: its attempts (each with its own wire id), deadlines and outcome."""

    __slots__ = (
        "id", "ids", "call", "index", "retries_left", "attempts", "opened", "final", "sent_at", "deadline",
        "done", "value", "error", "waiter", "via", "pin",
    )  # fmt: skip

    def __init__(self, call: Call, retries: int, index: int | None, opened: float, final: float, pin: int | None = None) -> None:
        self.id = ""  # the current attempt's id
        self.ids: dict[str, float | None] = {}  # every attempt's id: when it was handed to the socket (None: not yet)
        self.call = call
        self.index = index
        self.retries_left = retries
        self.attempts = 0
        self.opened = opened  # when the call (or the stream's frame) began: the time bound counts from here
        self.final = final  # opened + timeout * (retries + 1): nothing about this call outlives it
        self.sent_at = 0.0
        self.deadline = math.inf  # the current attempt's
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.waiter: Any = None  # for the driver: an asyncio future in aio.py
        self.via: int | None = None  # the broker (its index) the current attempt was handed to
        self.pin = pin  # a broker this call is for, whatever happens to it (health of each broker)

    @property
    def unsent(self) -> bool:
        return self.ids.get(self.id) is None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class StreamState:
    """In-order delivery for ``stream``: which calls are out, whether there is room, what is ready."""

    def __init__(self, pipeline: Pipeline, build: Callable[[Any], Call], max_in_flight: int, return_exceptions: bool) -> None:
        self.pipeline = pipeline
        self.build = build
        self.max_in_flight = max_in_flight
        self.return_exceptions = return_exceptions
        self.out: deque[Exchange] = deque()

    def room(self) -> bool:
        return len(self.out) < self.max_in_flight

    @property
    def head(self) -> Exchange | None:
        return self.out[0] if self.out else None

    def submit(self, index: int, frame: Any, now: float) -> Exchange:
        exchange = self.pipeline.open(self.build(frame), now, index=index)
        self.out.append(exchange)
        return exchange

    def ready(self) -> Iterator[Any]:
        """Settled results at the head, in order; a failure raises unless ``return_exceptions``."""
        while self.out and self.out[0].done:
            exchange = self.out.popleft()
            self.pipeline.forget(exchange)
            if exchange.error is not None and self.return_exceptions:
                yield exchange.error
            else:
                yield exchange.result()

    def abandon(self) -> None:
        """The consumer stopped: forget what is still out, so late replies are dropped."""
        for exchange in self.out:
            self.pipeline.forget(exchange)
        self.out.clear()


class LatestSlot:
    """The newest frame not yet sent. A newer frame replaces it, and the replaced one is dropped.

    Filled by a reader (a thread in client.py, a task in aio.py) that drains
    the caller's frame source as fast as it produces frames; taken by the
    stream loop whenever there is room in flight.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: tuple[int, Any] | None = None
        self.dropped = 0
        self.closed = False
        self.error: BaseException | None = None

    def put(self, index: int, frame: Any) -> None:
        with self._lock:
            if self._item is not None:
                self.dropped += 1
                log.debug("latest_only: dropping unsent frame %d for frame %d", self._item[0], index)
            self._item = (index, frame)

    def take(self) -> tuple[int, Any] | None:
        with self._lock:
            item, self._item = self._item, None
            return item

    def close(self, error: BaseException | None = None) -> None:
        with self._lock:
            self.closed = True
            self.error = error

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self.closed and self._item is None
