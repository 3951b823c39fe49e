"""The broker's state and decisions, with no socket in it (sans-IO).

``BrokerCore`` takes events stamped with a time (a client message, a worker
message, a tick, a send that failed) and returns the messages to send. The
socket loop (``loop.py``) only moves frames; everything that makes the
promises of PROTOCOL.md true lives here, where a state-machine test with a
fake clock can drive every interleaving:

- every request gets exactly one reply: a result relayed from a worker, or an
  error made here (late and duplicate worker replies are dropped);
- a dead worker's requests go to a live one, once: all expired workers are
  removed before anything is re-dispatched, and a send that failed on our
  side, or reached a worker that died before it could show a sign of life,
  costs the request nothing (up to MAX_DISPATCHES sends in all);
- no request waits while a live, recently heard worker serving its model has
  room: every change of capacity dispatches;
- the key is compared as soon as the header is a readable map;
- what the broker holds is bounded: queue count and bytes, bytes per client;
- no worker gets work it cannot finish before the deadline (measured time per
  request), and clients share a model's queue round robin;
- a worker that keeps holding requests past their deadlines gets no new work
  until it answers again.

Body frames are opaque: anything with a length (``zmq.Frame`` in the loop,
``bytes`` in tests) is passed through untouched.
"""

from __future__ import annotations

import collections
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from zdepth import __version__
from zdepth.config import BrokerConfig
from zdepth.errors import BadRequest
from zdepth.protocol import (
    DISCONNECT,
    HEARTBEAT,
    MODEL_OPS,
    OP_HEALTH,
    OP_RELATIVE,
    READY,
    REASON_SHUTDOWN,
    REASON_UNAUTHORIZED,
    REASON_UNKNOWN_WORKER,
    REPLY,
    REQUEST,
    STATUS_OK,
    command,
    error_header,
    header_id,
    keys_match,
    op_accepts_model,
    parse_command,
    read_request_map,
    reply_header,
    validate_request_header,
)
from zdepth.broker.stats import Stats

log = logging.getLogger("zdepth.broker")

IN_FLIGHT_GRACE_S = 1.0  # a dispatched request past its deadline gets this long before the broker answers for it
MAX_ATTEMPTS = 2  # a request lost with a worker that had it is re-queued once, then fails with worker_lost
# Dispatches of one request in all, counting those to workers that died before a sign of life could say they
# got it (two processes killed together: the second one's death is noticed only after the re-queue reached it).
# The cap keeps a request that kills every worker on receipt from bouncing forever.
MAX_DISPATCHES = 4
UNHEALTHY_AFTER = 2  # in-flight deadlines missed in a row before a worker gets no new work
SERVICE_EWMA = 0.3  # weight of the newest dispatch-to-reply time in a worker's estimate

CLIENT = "client"
WORKER = "worker"


@dataclass
class Outgoing:
    """One message for the loop to send: ``to`` is CLIENT or WORKER, ``rid`` marks a dispatch."""

    to: str
    identity: bytes
    frames: list[Any]
    rid: int | None = None


@dataclass
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


@dataclass
class WorkerState:
    identity: bytes
    models: frozenset[str]
    capacity: int
    info: dict[str, Any]
    heard: float
    started: float
    in_flight: dict[int, HeldRequest] = field(default_factory=dict)
    draining: bool = False
    missed: int = 0  # in-flight deadlines missed in a row; UNHEALTHY_AFTER of them stop new work
    service_s: float | None = None  # smoothed dispatch-to-reply time
    served: int = 0
    failed: int = 0

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.identity.hex())

    @property
    def unhealthy(self) -> bool:
        return self.missed >= UNHEALTHY_AFTER

    @property
    def load(self) -> float:
        return len(self.in_flight) / self.capacity


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

    def __iter__(self):
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

    def remove_where(self, predicate) -> list[HeldRequest]:
        """Take out every request for which ``predicate`` holds, keeping the others' order."""
        removed = []
        for client in list(self._by_client):
            queue = self._by_client[client]
            keep = collections.deque()
            for request in queue:
                (removed if predicate(request) else keep).append(request)
            if keep:
                self._by_client[client] = keep
            else:
                del self._by_client[client]
        self._count -= len(removed)
        return removed


class BrokerCore:
    """All of the broker but its sockets; see the module docstring for the promises it keeps."""

    def __init__(self, config: BrokerConfig, now: float) -> None:
        self.config = config
        self.started = now
        self.workers: dict[bytes, WorkerState] = {}
        self.queues: dict[str, FairQueue] = collections.defaultdict(FairQueue)
        self.queued = 0
        self.queued_bytes = 0
        self.dispatched: dict[int, HeldRequest] = {}
        self.client_bytes: collections.Counter[bytes] = collections.Counter()  # queued + in flight, per client
        self.held_bytes = 0  # body bytes of every request held, queued or in flight
        self.pending_ids: set[tuple[bytes, str]] = set()  # (client, id) of every request held
        self.model_last_seen: dict[str, float] = {}
        self.stats = Stats()
        self.stopping = False
        self.finished = False
        self._stop_by = 0.0
        self._rids = itertools.count(1)
        self._next_heartbeat = now
        self._out: list[Outgoing] = []
        self._recent_s = config.heartbeat.recent_s
        # A message that left the worker before a request reached it may arrive just after the dispatch;
        # only one heard this much later says the worker had the request.
        self._sign_of_life_s = config.heartbeat.interval_s / 2

    # ------------------------------------------------------------------ events

    def client_message(self, client: bytes, frames: list[Any], now: float, peer: str = "local") -> list[Outgoing]:
        """A message from a client's DEALER (identity frame already split off)."""
        if frames:
            self._on_client(client, frames[0], frames[1:], now, peer)
        return self._flush()

    def worker_message(self, worker: bytes, frames: list[Any], now: float, peer: str = "local") -> list[Outgoing]:
        """A message from a worker's DEALER (identity frame already split off)."""
        if frames:
            self._on_worker(worker, frames[0], frames[1:], now, peer)
        return self._flush()

    def tick(self, now: float) -> list[Outgoing]:
        """Time passed: heartbeats, liveness, deadlines, and the end of a drain."""
        if now >= self._next_heartbeat and not self.finished:
            self._next_heartbeat = now + self.config.heartbeat.interval_s
            for worker in self.workers.values():
                self._to_worker(worker.identity, [command(HEARTBEAT)])
        expired = [w for w in self.workers.values() if now - w.heard > self.config.heartbeat.expiry_s]
        if expired:
            self._remove_workers(expired, now, reason="heartbeat expired")
        self._expire_queued(now)
        self._expire_in_flight(now)
        self._fail_unservable(now)
        if self.stopping and not self.finished and (not self.dispatched or now >= self._stop_by):
            self._finish_stop()
        return self._flush()

    def worker_unreachable(self, worker: bytes, unsent: Iterable[int], now: float) -> list[Outgoing]:
        """Sends to ``worker`` failed on our side (the peer is gone): ``unsent`` dispatches never left.

        Those requests are re-queued as if never sent; the worker is removed,
        and what it held before is re-queued as for a dead worker.
        """
        state = self.workers.get(worker)
        if state is not None:
            for rid in unsent:
                request = state.in_flight.get(rid)
                if request is not None:
                    request.dispatches -= 1
            self._remove_workers([state], now, reason="unreachable")
        return self._flush()

    def client_unreachable(self, client: bytes) -> None:
        """A reply could not be queued for ``client`` (gone, or not reading): it is lost to that client only."""
        self.stats.dropped_replies += 1

    def stop(self, now: float) -> list[Outgoing]:
        """Begin a drain: queued requests fail, new ones are refused, in-flight ones get drain_timeout_s."""
        if not self.stopping:
            self.stopping = True
            self._stop_by = now + self.config.drain_timeout_s
            for queue in self.queues.values():
                for request in queue.remove_where(lambda _: True):
                    self._count_out(request)
                    self._fail(request, "overloaded", "the broker is shutting down; retry in a moment", now)
            log.info("broker stopping: %d requests in flight get up to %.1f s", len(self.dispatched), self.config.drain_timeout_s)
        return self.tick(now)

    # ------------------------------------------------------------------ clients

    def _on_client(self, client: bytes, head: Any, body: list[Any], now: float, peer: str) -> None:
        try:
            fields = read_request_map(memoryview(head))
        except BadRequest as exc:
            self._reply_error(client, None, "bad_request", str(exc), now, now, peer=peer)
            return
        request_id = header_id(fields)
        if not keys_match(fields.get("key"), self.config.key):
            self._reply_error(client, request_id, "unauthorized", "wrong or missing key; set ZDEPTH_KEY or --key-file", now, now, peer=peer)
            return
        try:
            header = validate_request_header(fields)
        except BadRequest as exc:
            self._reply_error(client, request_id, "bad_request", str(exc), now, now, peer=peer)
            return
        if header.op == OP_HEALTH:
            self._to_client(client, [reply_header(header.id, health=self.health(now))])
            self.stats.count("health", STATUS_OK)
            return
        if self.stopping:
            self._reply_error(client, header.id, "overloaded", "the broker is shutting down; retry in a moment", now, now, peer=peer)
            return
        if header.op in MODEL_OPS and len(body) != 2:
            self._reply_error(client, header.id, "bad_request", f"op {header.op!r} needs 2 body frames (params, image), got {len(body)}", now, now, peer=peer)
            return
        if (client, header.id) in self.pending_ids:
            self._reply_error(client, header.id, "bad_request", f"request id {header.id!r} is already in flight on this connection; ids must be unique among a client's pending requests", now, now, peer=peer)
            return
        model = header.model or self._default_model(header.op)
        if model is None or not self._may_be_served(model, now):
            message, details = self._unknown_model(model, header.op)
            self._reply_error(client, header.id, "unknown_model", message, now, now, peer=peer, details=details)
            return
        if not op_accepts_model(header.op, model):
            kind = "a relative model such as 'vits'" if header.op == OP_RELATIVE else "a metric model such as 'vits-hypersim'"
            self._reply_error(client, header.id, "bad_request", f"op {header.op!r} needs {kind}, got {model!r}", now, now, peer=peer)
            return
        size = sum(len(frame) for frame in body)
        refusal = self._admission(client, size)
        if refusal:
            self._reply_error(client, header.id, "overloaded", refusal, now, now, peer=peer)
            return
        timeout_s = header.timeout_ms / 1000 if header.timeout_ms else self.config.default_timeout_s
        request = HeldRequest(client, header.id, header.op, model, body, size, peer, received=now, deadline=now + timeout_s)
        self.pending_ids.add((client, header.id))
        self.client_bytes[client] += size
        self.held_bytes += size
        self._enqueue(request)
        self._dispatch(model, now)

    def _admission(self, client: bytes, size: int) -> str | None:
        """Why a new request of ``size`` body bytes may not be queued, or None."""
        # The limits count what is at workers too, so re-queueing a dead worker's requests never exceeds them.
        config = self.config
        held = self.queued + len(self.dispatched)
        if held >= config.max_queue:
            return f"{held} requests are waiting or at workers (limit {config.max_queue}); retry later or add workers"
        if held and self.held_bytes + size > config.max_queue_bytes:
            return f"{self.held_bytes} bytes of requests are waiting or at workers (limit {config.max_queue_bytes}); retry later or add workers"
        held = self.client_bytes[client]
        if held and held + size > config.max_client_bytes:
            return f"this connection already has {held} bytes of requests at the broker (limit {config.max_client_bytes}); wait for replies"
        return None

    def _served_models(self) -> list[str]:
        return sorted({m for w in self.workers.values() if not w.draining for m in w.models})

    def _unknown_model(self, model: str | None, op: str) -> tuple[str, dict[str, Any]]:
        served = self._served_models()
        hint = f"served models: {', '.join(served)}" if served else "no worker is connected"
        return f"no worker serves model {model or '(default)'!r} for op {op!r}; {hint}", {"served": served}

    def _default_model(self, op: str) -> str | None:
        """The server's default when a request names no model: the first served model that fits the op."""
        return next((m for m in self._served_models() if op_accepts_model(op, m)), None)

    def _may_be_served(self, model: str, now: float) -> bool:
        """Served now, or recently enough (or the broker is young enough) that its workers are probably
        reconnecting: such requests wait in the queue instead of failing at once."""
        if any(model in w.models for w in self.workers.values()):
            return True
        grace = self.config.reconnect_grace_s
        if now - self.started < grace:
            return True
        return now - self.model_last_seen.get(model, -grace) < grace

    # ------------------------------------------------------------------ dispatch

    def _live(self, worker: WorkerState, now: float) -> bool:
        """May get new work: heard from recently, not draining, not holding requests past their deadlines."""
        return not worker.draining and not worker.unhealthy and now - worker.heard <= self._recent_s

    def _dispatch(self, model: str, now: float) -> None:
        """Send queued requests for ``model`` to the least-loaded live workers with room."""
        queue = self.queues.get(model)
        while queue:
            candidates = [
                w for w in self.workers.values()
                if model in w.models and len(w.in_flight) < w.capacity and self._live(w, now)
            ]
            if not candidates:
                return
            request = queue.pop()
            self._count_out(request)
            left = request.deadline - now
            if left <= 0:
                self._fail(request, "timeout", "the deadline passed while the request waited for a worker", now)
                continue
            # An idle worker always gets work (that is how its estimate stays fresh); a busy one only
            # what it can finish in time, so no GPU computes a reply nobody will read.
            fits = [w for w in candidates if not w.in_flight or w.service_s is None or w.service_s <= left]
            if not fits:
                quickest = min(w.service_s for w in candidates if w.service_s is not None)
                self._fail(request, "timeout", self._too_slow(model, quickest, left), now)
                continue
            worker = min(fits, key=lambda w: (w.load, w.service_s or 0.0))
            self._send_request(worker, request, now)

    def _send_request(self, worker: WorkerState, request: HeldRequest, now: float) -> None:
        request.rid, request.worker, request.dispatched = next(self._rids), worker.identity, now
        request.dispatches += 1
        worker.in_flight[request.rid] = request
        self.dispatched[request.rid] = request
        header = command(
            REQUEST,
            rid=request.rid,
            id=request.id,
            op=request.op,
            model=request.model,
            timeout_ms=max(1.0, 1000 * (request.deadline - now)),
            client=request.peer,
        )
        self._out.append(Outgoing(WORKER, worker.identity, [header, *request.body], rid=request.rid))

    def _dispatch_all(self, models: Iterable[str], now: float) -> None:
        for model in sorted(set(models)):
            self._dispatch(model, now)

    def _enqueue(self, request: HeldRequest, *, front: bool = False) -> None:
        self.queues[request.model].push(request, front=front)
        self.queued += 1
        self.queued_bytes += request.size

    def _count_out(self, request: HeldRequest) -> None:
        self.queued -= 1
        self.queued_bytes -= request.size

    def _expire_queued(self, now: float) -> None:
        """Fail what waited past its deadline, and what could no longer finish even if a worker took it now."""
        for model, queue in self.queues.items():
            if not queue:
                continue
            quickest = self._quickest(model, now)
            for request in queue.remove_where(lambda r: r.deadline - now < quickest):
                self._count_out(request)
                if request.deadline <= now:
                    self._fail(request, "timeout", "the deadline passed while the request waited for a worker", now)
                else:
                    self._fail(request, "timeout", self._too_slow(model, quickest, request.deadline - now), now)

    def _quickest(self, model: str, now: float) -> float:
        """The shortest time any live worker for ``model`` is measured to take per request (0 when unknown)."""
        estimates = [w.service_s for w in self.workers.values() if model in w.models and self._live(w, now)]
        if not estimates or None in estimates:
            return 0.0
        return min(estimates)

    @staticmethod
    def _too_slow(model: str, quickest: float, left: float) -> str:
        return f"the workers for {model!r} take about {1000 * quickest:.0f} ms a request now; only {1000 * left:.0f} ms were left before the deadline"

    def _fail_unservable(self, now: float) -> None:
        """Requests for a model whose workers did not come back in time fail with unknown_model."""
        for model, queue in self.queues.items():
            if queue and not self._may_be_served(model, now):
                for request in queue.remove_where(lambda _: True):
                    self._count_out(request)
                    message, details = self._unknown_model(model, request.op)
                    self._fail(request, "unknown_model", message, now, details=details)

    def _expire_in_flight(self, now: float) -> None:
        """Answer for a worker that holds a request past its deadline; its late reply is then dropped."""
        freed: set[bytes] = set()
        for rid, request in list(self.dispatched.items()):
            if request.deadline + IN_FLIGHT_GRACE_S <= now:
                worker = self._forget(rid)
                self._fail(request, "timeout", "the worker did not answer before the deadline", now)
                if worker is not None:
                    worker.missed += 1
                    if worker.missed == UNHEALTHY_AFTER:
                        log.warning("worker %s holds requests past their deadlines; no new work until it answers", worker.name)
                    freed.add(worker.identity)
        for identity in freed:
            worker = self.workers.get(identity)
            if worker is not None:
                self._after_capacity_change(worker, now)

    def _forget(self, rid: int) -> WorkerState | None:
        """Take a dispatched request off the books; returns the worker that held it, if still known."""
        request = self.dispatched.pop(rid)
        worker = self.workers.get(request.worker)
        if worker is not None:
            worker.in_flight.pop(rid, None)
        request.rid = request.worker = None
        return worker

    def _after_capacity_change(self, worker: WorkerState, now: float) -> None:
        """A worker has room again (or is gone): remove it if it drained, else hand it work."""
        if worker.draining and not worker.in_flight:
            self._remove_workers([worker], now, reason="drained")
        else:
            self._dispatch_all(worker.models, now)

    # ------------------------------------------------------------------ workers

    def _on_worker(self, identity: bytes, head: Any, body: list[Any], now: float, peer: str) -> None:
        try:
            header = parse_command(memoryview(head))
        except BadRequest as exc:
            log.warning("dropped a malformed message from worker %s: %s", identity.hex(), exc)
            return
        cmd = header["cmd"]
        if cmd == READY:
            self._on_ready(identity, header, now, peer)
            return
        worker = self.workers.get(identity)
        if worker is None:
            # Not registered (or forgotten, say after a broker restart): ask it to announce itself again.
            self._to_worker(identity, [command(DISCONNECT, reason=REASON_UNKNOWN_WORKER)])
            return
        was_live = self._live(worker, now)
        worker.heard = now
        if cmd == REPLY:
            self._on_reply(worker, header, body, now)
        elif cmd == DISCONNECT:
            log.info("worker %s is draining (%s); %d requests still in flight", worker.name, header.get("reason"), len(worker.in_flight))
            worker.draining = True
            if not worker.in_flight:
                self._remove_workers([worker], now, reason="drained")
        elif cmd != HEARTBEAT:
            log.warning("worker %s sent unknown command %r; ignored", worker.name, cmd)
        if not was_live and self._live(worker, now):
            self._dispatch_all(worker.models, now)  # back in touch: it may take what waits

    def _on_ready(self, identity: bytes, header: dict[str, Any], now: float, peer: str) -> None:
        if self.stopping:
            self._to_worker(identity, [command(DISCONNECT, reason=REASON_SHUTDOWN)])
            return
        if not keys_match(header.get("key"), self.config.key):
            log.warning("refused worker from %s: wrong or missing key", peer)
            self._to_worker(identity, [command(DISCONNECT, reason=REASON_UNAUTHORIZED)])
            return
        models, capacity, info = header.get("models"), header.get("capacity"), header.get("info") or {}
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and m for m in models)
            or isinstance(capacity, bool)
            or not isinstance(capacity, int)
            or capacity < 1
            or not isinstance(info, dict)
        ):
            log.warning("refused worker from %s: READY needs a list of models and a capacity >= 1", peer)
            return
        old = self.workers.get(identity)
        if old is not None:
            self._remove_workers([old], now, reason="announced itself again")
        worker = WorkerState(identity, frozenset(models), capacity, {**info, "peer": peer}, heard=now, started=now)
        self.workers[identity] = worker
        for model in models:
            self.model_last_seen[model] = now
        log.info("worker %s ready from %s: models %s, capacity %d", worker.name, peer, ", ".join(sorted(models)), capacity)
        self._dispatch_all(models, now)

    def _on_reply(self, worker: WorkerState, header: dict[str, Any], body: list[Any], now: float) -> None:
        rid = header.get("rid")
        request = self.dispatched.get(rid) if isinstance(rid, int) and not isinstance(rid, bool) else None
        worker.missed = 0  # it answers: whatever held it up is over
        if request is None or request.worker != worker.identity:
            log.debug("dropped a late or unknown reply (rid %r) from worker %s", rid, worker.name)
            self._after_capacity_change(worker, now)
            return
        self._forget(rid)
        elapsed = now - request.dispatched
        worker.service_s = elapsed if worker.service_s is None else (1 - SERVICE_EWMA) * worker.service_s + SERVICE_EWMA * elapsed
        status = header.get("status", STATUS_OK)
        if not body:
            self._fail(request, "internal", f"worker {worker.name} sent an empty reply", now)
        else:
            if status == STATUS_OK:
                worker.served += 1
            else:
                worker.failed += 1
            self._release(request)
            self._to_client(request.client, body)
            self.stats.answered(request.op, request.model, str(status), now - request.received, worker.name)
            log.debug("%s op=%s model=%s status=%s latency_ms=%.2f worker=%s", request.peer, request.op, request.model, status, 1000 * (now - request.received), worker.name)
        self._after_capacity_change(worker, now)

    def _remove_workers(self, workers: list[WorkerState], now: float, *, reason: str) -> None:
        """Forget every one of ``workers`` first, then re-queue what they held (once) and dispatch.

        Removing them all before re-dispatching is what keeps a request from
        being re-queued onto a worker that is itself about to be removed.
        """
        lost: list[HeldRequest] = []
        models: set[str] = set()
        for worker in workers:
            if self.workers.pop(worker.identity, None) is None:
                continue
            models |= worker.models
            for model in worker.models:
                self.model_last_seen[model] = now
            level = logging.INFO if reason == "drained" else logging.WARNING
            log.log(level, "worker %s removed (%s); %d requests in flight", worker.name, reason, len(worker.in_flight))
            for rid in list(worker.in_flight):
                request = self.dispatched.pop(rid)
                if worker.heard > request.dispatched + self._sign_of_life_s:  # alive after it got the request: a real loss
                    request.attempts += 1
                request.rid = request.worker = None
                lost.append(request)
            worker.in_flight.clear()
        for request in sorted(lost, key=lambda r: r.received, reverse=True):
            if self.stopping:
                self._fail(request, "overloaded", "the broker is shutting down and the worker holding this request left; retry in a moment", now)
            elif request.attempts >= MAX_ATTEMPTS or request.dispatches >= MAX_DISPATCHES:
                self._fail(request, "worker_lost", f"the workers holding this request died ({request.dispatches} dispatches); retry, and check the workers' logs", now)
            else:
                self._enqueue(request, front=True)  # oldest first, ahead of newer work
        self._dispatch_all(models, now)

    # ------------------------------------------------------------------ replies and shutdown

    def _release(self, request: HeldRequest) -> None:
        """The request is answered: what the broker held for its client is freed."""
        self.pending_ids.discard((request.client, request.id))
        self.client_bytes[request.client] -= request.size
        self.held_bytes -= request.size
        if self.client_bytes[request.client] <= 0:
            del self.client_bytes[request.client]

    def _fail(self, request: HeldRequest, code: str, message: str, now: float, *, details: dict[str, Any] | None = None) -> None:
        self._release(request)
        self._reply_error(request.client, request.id, code, message, request.received, now, peer=request.peer, op=request.op, model=request.model, details=details)

    def _reply_error(
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
        self._to_client(client, [error_header(request_id, code, message, details)])
        self.stats.answered(op, model, code, now - received, None)
        log.debug("%s op=%s model=%s status=%s latency_ms=%.2f", peer, op, model, code, 1000 * (now - received))

    def _finish_stop(self) -> None:
        for rid in list(self.dispatched):
            request = self.dispatched[rid]
            self._forget(rid)
            self._fail(request, "overloaded", "the broker shut down before the worker answered; retry in a moment", self._stop_by)
        for worker in self.workers.values():
            self._to_worker(worker.identity, [command(DISCONNECT, reason=REASON_SHUTDOWN)])
        self.finished = True
        log.info("broker stopped")

    def _to_client(self, client: bytes, frames: list[Any]) -> None:
        self._out.append(Outgoing(CLIENT, client, frames))

    def _to_worker(self, worker: bytes, frames: list[Any]) -> None:
        self._out.append(Outgoing(WORKER, worker, frames))

    def _flush(self) -> list[Outgoing]:
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------------ health

    def health(self, now: float) -> dict[str, Any]:
        return {
            "status": "stopping" if self.stopping else "ok",
            "version": __version__,
            "uptime_s": round(now - self.started, 3),
            "queued": {m: len(q) for m, q in self.queues.items() if q},
            "queued_total": self.queued,
            "queued_bytes": self.queued_bytes,
            "queue_limit": self.config.max_queue,
            "in_flight": len(self.dispatched),
            "models": self._served_models(),
            "workers": [self._worker_health(w, now) for w in self.workers.values()],
        }

    def _worker_health(self, worker: WorkerState, now: float) -> dict[str, Any]:
        if worker.draining:
            state = "draining"
        elif worker.unhealthy:
            state = "unhealthy"
        elif now - worker.heard > self.config.heartbeat.recent_s:
            state = "silent"
        else:
            state = "ready"
        return {
            **{k: v for k, v in worker.info.items() if k in ("name", "host", "pid", "device", "precision", "version", "max_batch", "threads", "peer")},
            "models": sorted(worker.models),
            "capacity": worker.capacity,
            "in_flight": len(worker.in_flight),
            "served": worker.served,
            "failed": worker.failed,
            "state": state,
            "draining": worker.draining,
            "unhealthy": worker.unhealthy,
            "service_ms": None if worker.service_s is None else round(1000 * worker.service_s, 3),
            "heard_s_ago": round(now - worker.heard, 3),
            "uptime_s": round(now - worker.started, 3),
        }

