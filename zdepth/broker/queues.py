"""What the broker holds: each request as it waits or is at a worker, and what it counts against the limits.

``FairQueue`` is one model's waiting line (FIFO per client, clients round
robin); ``Holdings`` keeps every queue, every dispatched request and the
counts the limits are judged on, so that no path that moves a request can
forget to count it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from zdepth.config import BrokerConfig


@dataclass(slots=True)
class HeldRequest:
    """A client request as the broker holds it, queued or at a worker; ``body`` is never read."""

    client: bytes
    id: str
    op: str
    model: str
    body: list[Any]
    size: int
    peer: str
    received: float
    deadline: float
    attempts: int = 0  # losses with a worker known to have had it (heard from after the dispatch)
    dispatches: int = 0  # sends to workers, in all
    rid: int | None = None
    worker: bytes | None = None
    dispatched: float = 0.0


class FairQueue:
    """A model's waiting requests: FIFO per client, clients served round robin.

    One client's backlog cannot starve another's single request: each pop takes
    the oldest request of the client whose turn it is.
    """

    def __init__(self) -> None:
        self._by_client: collections.OrderedDict[bytes, collections.deque[HeldRequest]] = collections.OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[HeldRequest]:
        for queue in self._by_client.values():
            yield from queue

    def push(self, request: HeldRequest, *, front: bool = False) -> None:
        queue = self._by_client.get(request.client)
        if queue is None:
            queue = self._by_client[request.client] = collections.deque()
            if front:
                self._by_client.move_to_end(request.client, last=False)
        if front:
            queue.appendleft(request)
        else:
            queue.append(request)
        self._count += 1

    def pop(self) -> HeldRequest:
        client, queue = next(iter(self._by_client.items()))
        request = queue.popleft()
        if queue:
            self._by_client.move_to_end(client)
        else:
            del self._by_client[client]
        self._count -= 1
        return request

    def remove_where(self, predicate: Callable[[HeldRequest], bool]) -> list[HeldRequest]:
        """Take out every request for which ``predicate`` holds, keeping the others' order."""
        removed = []
        for client in list(self._by_client):
            queue = self._by_client[client]
            keep: collections.deque[HeldRequest] = collections.deque()
            for request in queue:
                (removed if predicate(request) else keep).append(request)
            if keep:
                self._by_client[client] = keep
            else:
                del self._by_client[client]
        self._count -= len(removed)
        return removed


class Holdings:
    """Every request the broker holds, queued or at a worker, and the counts its limits are judged on.

    A request is ``hold``-ed once on arrival and ``release``-d once when
    answered; in between it moves between the queues (``enqueue``, and the
    ``pop``/``remove_where`` that count it out) and ``dispatched``.
    """

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.queues: dict[str, FairQueue] = collections.defaultdict(FairQueue)
        self.queued = 0
        self.queued_bytes = 0
        self.dispatched: dict[int, HeldRequest] = {}  # by rid
        self.client_bytes: dict[bytes, int] = {}  # queued + in flight, per client
        self.total_bytes = 0  # body bytes of every request held, queued or in flight
        self.pending_ids: set[tuple[bytes, str]] = set()  # (client, id) of every request held

    def refusal(self, client: bytes, size: int) -> str | None:
        """Why a new request of ``size`` body bytes may not be queued, or None."""
        # The limits count what is at workers too, so re-queueing a dead worker's requests never exceeds them.
        config = self.config
        held = self.queued + len(self.dispatched)
        if held >= config.max_queue:
            return f"{held} requests are waiting or at workers (limit {config.max_queue}); retry later or add workers"
        if held and self.total_bytes + size > config.max_queue_bytes:
            return f"{self.total_bytes} bytes of requests are waiting or at workers (limit {config.max_queue_bytes}); retry later or add workers"
        held = self.client_bytes.get(client, 0)
        if held and held + size > config.max_client_bytes:
            return f"this connection already has {held} bytes of requests at the broker (limit {config.max_client_bytes}); wait for replies"
        return None

    def hold(self, request: HeldRequest) -> None:
        """A new request is admitted: its id and bytes count until ``release``."""
        self.pending_ids.add((request.client, request.id))
        self.client_bytes[request.client] = self.client_bytes.get(request.client, 0) + request.size
        self.total_bytes += request.size

    def release(self, request: HeldRequest) -> None:
        """The request is answered: what the broker held for its client is freed."""
        self.pending_ids.discard((request.client, request.id))
        self.total_bytes -= request.size
        left = self.client_bytes[request.client] - request.size
        if left > 0:
            self.client_bytes[request.client] = left
        else:
            del self.client_bytes[request.client]

    def enqueue(self, request: HeldRequest, *, front: bool = False) -> None:
        self.queues[request.model].push(request, front=front)
        self.queued += 1
        self.queued_bytes += request.size

    def pop(self, queue: FairQueue) -> HeldRequest:
        """The next request of ``queue`` (one of ``queues``), counted out."""
        request = queue.pop()
        self._count_out(request)
        return request

    def remove_where(self, queue: FairQueue, predicate: Callable[[HeldRequest], bool]) -> list[HeldRequest]:
        """Take the requests of ``queue`` for which ``predicate`` holds, counted out."""
        removed = queue.remove_where(predicate)
        for request in removed:
            self._count_out(request)
        return removed

    def _count_out(self, request: HeldRequest) -> None:
        self.queued -= 1
        self.queued_bytes -= request.size
