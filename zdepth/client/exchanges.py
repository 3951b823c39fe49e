"""Calls in flight: an ``Exchange`` per call, its attempts and its outcome.

A call becomes an exchange when the pipeline opens it; each send of it is an
attempt with a wire id of its own (``new_attempt_id``), so a late reply to an
earlier attempt is told from the current one. Sans-IO.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from zdepth.client.calls import Call


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
