"""What the broker's core says back: messages queued in order for the loop to send, error replies counted.

The core never sends: each event's handler puts its messages here and the
core returns them (``flush``) to the loop, which moves the frames. An error
reply is made, counted in ``Stats`` and logged in one place, so every way a
request can fail is measured the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from zdepth.broker.stats import Stats
from zdepth.protocol import error_header

log = logging.getLogger("zdepth.broker")

CLIENT = "client"
WORKER = "worker"


@dataclass(slots=True)
class Outgoing:
    """One message for the loop to send: ``to`` is CLIENT or WORKER, ``rid`` marks a dispatch."""

    to: str
    identity: bytes
    frames: list[Any]
    rid: int | None = None


class Outbox:
    """The messages made while handling one event, in the order they must leave."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._out: list[Outgoing] = []

    def to_client(self, client: bytes, frames: list[Any]) -> None:
        self._out.append(Outgoing(CLIENT, client, frames))

    def to_worker(self, worker: bytes, frames: list[Any], *, rid: int | None = None) -> None:
        self._out.append(Outgoing(WORKER, worker, frames, rid=rid))

    def error(
        self,
        client: bytes,
        request_id: str | None,
        code: str,
        message: str,
        received: float,
        now: float,
        *,
        peer: str,
        op: str = "?",
        model: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """An error reply for ``client``, counted as answered ``now - received`` after arrival."""
        self.to_client(client, [error_header(request_id, code, message, details)])
        self.stats.answered(op, model, code, now - received, None)
        log.debug("%s op=%s model=%s status=%s latency_ms=%.2f", peer, op, model, code, 1000 * (now - received))

    def flush(self) -> list[Outgoing]:
        """Everything queued since the last flush; the outbox is empty after."""
        out, self._out = self._out, []
        return out
