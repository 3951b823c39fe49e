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

The core keeps its state in three parts, each in its own module:
``queues`` (the requests held and the counts of the limits), ``workers``
(the registry, liveness and service-time estimates) and ``outbox`` (the
messages an event makes). The decisions that tie them together are here.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable

from zdepth import __version__
from zdepth.broker.outbox import CLIENT, WORKER, Outbox, Outgoing
from zdepth.broker.queues import HeldRequest, Holdings
from zdepth.broker.stats import Stats
from zdepth.broker.workers import UNHEALTHY_AFTER, WorkerRegistry, WorkerState, read_ready
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
    header_id,
    keys_match,
    op_accepts_model,
    parse_command,
    read_request_map,
    reply_header,
    validate_request_header,
)

__all__ = ["CLIENT", "IN_FLIGHT_GRACE_S", "MAX_ATTEMPTS", "MAX_DISPATCHES", "WORKER", "BrokerCore", "HeldRequest", "Outgoing"]

log = logging.getLogger("zdepth.broker")

IN_FLIGHT_GRACE_S = 1.0  # a dispatched request past its deadline gets this long before the broker answers for it
MAX_ATTEMPTS = 2  # a request lost with a worker that had it is re-queued once, then fails with worker_lost
# Dispatches of one request in all, counting those to workers that died before a sign of life could say they
# got it (two processes killed together: the second one's death is noticed only after the re-queue reached it).
# The cap keeps a request that kills every worker on receipt from bouncing forever.
MAX_DISPATCHES = 4


class BrokerCore:
    """All of the broker but its sockets; see the module docstring for the promises it keeps."""

    def __init__(self, config: BrokerConfig, now: float) -> None:
        self.config = config
        self.started = now
        self.workers = WorkerRegistry(config, now)
        self.held = Holdings(config)  # every request held, queued or dispatched, and the counts of the limits
        self.stats = Stats()
        self.stopping = False
        self.finished = False
        self._stop_by = 0.0
        self._rids = itertools.count(1)
        self._next_heartbeat = now
        self.out = Outbox(self.stats)  # what the event being handled makes, for the loop to send
        # A message that left the worker before a request reached it may arrive just after the dispatch;
        # only one heard this much later says the worker had the request.
        self._sign_of_life_s = config.heartbeat.interval_s / 2

    # ------------------------------------------------------------------ events

    def client_message(self, client: bytes, frames: list[Any], now: float, peer: str = "local") -> list[Outgoing]:
        """A message from a client's DEALER (identity frame already split off)."""
        if frames:
            self._on_client(client, frames[0], frames[1:], now, peer)
        return self.out.flush()

    def worker_message(self, worker: bytes, frames: list[Any], now: float, peer: str = "local") -> list[Outgoing]:
        """A message from a worker's DEALER (identity frame already split off)."""
        if frames:
            self._on_worker(worker, frames[0], frames[1:], now, peer)
        return self.out.flush()

    def tick(self, now: float) -> list[Outgoing]:
        """Time passed: heartbeats, liveness, deadlines, and the end of a drain."""
        if now >= self._next_heartbeat and not self.finished:
            self._next_heartbeat = now + self.config.heartbeat.interval_s
            for worker in self.workers.values():
                self.out.to_worker(worker.identity, [command(HEARTBEAT)])
        expired = [w for w in self.workers.values() if now - w.heard > self.config.heartbeat.expiry_s]
        if expired:
            self._remove_workers(expired, now, reason="heartbeat expired")
        self._expire_queued(now)
        self._expire_in_flight(now)
        self._fail_unservable(now)
        if self.stopping and not self.finished and (not self.held.dispatched or now >= self._stop_by):
            self._finish_stop()
        return self.out.flush()

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
        return self.out.flush()

    def client_unreachable(self, client: bytes) -> None:
        """A reply could not be queued for ``client`` (gone, or not reading): it is lost to that client only."""
        self.stats.dropped_replies += 1

    def stop(self, now: float) -> list[Outgoing]:
        """Begin a drain: queued requests fail, new ones are refused, in-flight ones get drain_timeout_s."""
        if not self.stopping:
            self.stopping = True
            self._stop_by = now + self.config.drain_timeout_s
            for queue in self.held.queues.values():
                for request in self.held.remove_where(queue, lambda _: True):
                    self._fail(request, "overloaded", "the broker is shutting down; retry in a moment", now)
            log.info("broker stopping: %d requests in flight get up to %.1f s", len(self.held.dispatched), self.config.drain_timeout_s)
        return self.tick(now)

    # ------------------------------------------------------------------ clients

    def _on_client(self, client: bytes, head: Any, body: list[Any], now: float, peer: str) -> None:
        try:
            fields = read_request_map(memoryview(head))
        except BadRequest as exc:
            self.out.error(client, None, "bad_request", str(exc), now, now, peer=peer)
            return
        request_id = header_id(fields)
        if not keys_match(fields.get("key"), self.config.key):
            self.out.error(client, request_id, "unauthorized", "wrong or missing key; set ZDEPTH_KEY or --key-file", now, now, peer=peer)
            return
        try:
            header = validate_request_header(fields)
        except BadRequest as exc:
            self.out.error(client, request_id, "bad_request", str(exc), now, now, peer=peer)
            return
        if header.op == OP_HEALTH:
            self.out.to_client(client, [reply_header(header.id, health=self.health(now))])
            self.stats.count("health", STATUS_OK)
            return
        if self.stopping:
            self.out.error(client, header.id, "overloaded", "the broker is shutting down; retry in a moment", now, now, peer=peer)
            return
        if header.op in MODEL_OPS and len(body) != 2:
            self.out.error(client, header.id, "bad_request", f"op {header.op!r} needs 2 body frames (params, image), got {len(body)}", now, now, peer=peer)
            return
        if (client, header.id) in self.held.pending_ids:
            message = f"request id {header.id!r} is already in flight on this connection; ids must be unique among a client's pending requests"
            self.out.error(client, header.id, "bad_request", message, now, now, peer=peer)
            return
        model = header.model or self.workers.default_model(header.op)
        if model is None or not self.workers.may_be_served(model, now):
            message, details = self.workers.unknown_model(model, header.op)
            self.out.error(client, header.id, "unknown_model", message, now, now, peer=peer, details=details)
            return
        if not op_accepts_model(header.op, model):
            kind = "a relative model such as 'vits'" if header.op == OP_RELATIVE else "a metric model such as 'vits-hypersim'"
            self.out.error(client, header.id, "bad_request", f"op {header.op!r} needs {kind}, got {model!r}", now, now, peer=peer)
            return
        size = sum(map(len, body))
        refusal = self.held.refusal(client, size)
        if refusal:
            self.out.error(client, header.id, "overloaded", refusal, now, now, peer=peer)
            return
        timeout_s = header.timeout_ms / 1000 if header.timeout_ms else self.config.default_timeout_s
        request = HeldRequest(client, header.id, header.op, model, body, size, peer, received=now, deadline=now + timeout_s)
        self.held.hold(request)
        candidates = None if self.held.queues.get(model) else self.workers.with_room(model, now)
        if candidates:  # nothing waits ahead of it: straight to a worker
            self._place(request, candidates, now)
        else:
            self.held.enqueue(request)

    def _dispatch(self, model: str, now: float) -> None:
        """Send queued requests for ``model`` to the least-loaded live workers with room."""
        queue = self.held.queues.get(model)
        while queue:
            candidates = self.workers.with_room(model, now)
            if not candidates:
                return
            self._place(self.held.pop(queue), candidates, now)

    def _place(self, request: HeldRequest, candidates: list[WorkerState], now: float) -> None:
        """Send ``request`` to the least-loaded of ``candidates`` (live, with room) that can finish it in time, or fail it."""
        left = request.deadline - now
        if left <= 0:
            self._fail(request, "timeout", "the deadline passed while the request waited for a worker", now)
            return
        # An idle worker always gets work (that is how its estimate stays fresh); a busy one only
        # what it can finish in time, so no GPU computes a reply nobody will read.
        fits = [w for w in candidates if not w.in_flight or w.service_s is None or w.service_s <= left]
        if not fits:
            quickest = min(w.service_s for w in candidates if w.service_s is not None)
            self._fail(request, "timeout", self._too_slow(request.model, quickest, left), now)
            return
        worker = min(fits, key=lambda w: (w.load, w.service_s or 0.0))
        self._send_request(worker, request, now)

    def _send_request(self, worker: WorkerState, request: HeldRequest, now: float) -> None:
        request.rid, request.worker, request.dispatched = next(self._rids), worker.identity, now
        request.dispatches += 1
        worker.in_flight[request.rid] = request
        self.held.dispatched[request.rid] = request
        header = command(
            REQUEST,
            rid=request.rid,
            id=request.id,
            op=request.op,
            model=request.model,
            timeout_ms=max(1.0, 1000 * (request.deadline - now)),
            client=request.peer,
        )
        self.out.to_worker(worker.identity, [header, *request.body], rid=request.rid)

    def _dispatch_all(self, models: Iterable[str], now: float) -> None:
        queues = self.held.queues
        for model in sorted({m for m in models if queues.get(m)}):
            self._dispatch(model, now)

    def _expire_queued(self, now: float) -> None:
        """Fail what waited past its deadline, and what could no longer finish even if a worker took it now."""
        for model, queue in self.held.queues.items():
            if not queue:
                continue
            quickest = self.workers.quickest(model, now)
            for request in self.held.remove_where(queue, lambda r: r.deadline - now < quickest):
                if request.deadline <= now:
                    self._fail(request, "timeout", "the deadline passed while the request waited for a worker", now)
                else:
                    self._fail(request, "timeout", self._too_slow(model, quickest, request.deadline - now), now)

    @staticmethod
    def _too_slow(model: str, quickest: float, left: float) -> str:
        return f"the workers for {model!r} take about {1000 * quickest:.0f} ms a request now; only {1000 * left:.0f} ms were left before the deadline"

    def _fail_unservable(self, now: float) -> None:
        """Requests for a model whose workers did not come back in time fail with unknown_model."""
        for model, queue in self.held.queues.items():
            if queue and not self.workers.may_be_served(model, now):
                for request in self.held.remove_where(queue, lambda _: True):
                    message, details = self.workers.unknown_model(model, request.op)
                    self._fail(request, "unknown_model", message, now, details=details)

    def _expire_in_flight(self, now: float) -> None:
        """Answer for a worker that holds a request past its deadline; its late reply is then dropped."""
        freed: set[bytes] = set()
        for rid, request in list(self.held.dispatched.items()):
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
        request = self.held.dispatched.pop(rid)
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
            self.out.to_worker(identity, [command(DISCONNECT, reason=REASON_UNKNOWN_WORKER)])
            return
        was_live = self.workers.live(worker, now)
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
        if not was_live and self.workers.live(worker, now):
            self._dispatch_all(worker.models, now)  # back in touch: it may take what waits

    def _on_ready(self, identity: bytes, header: dict[str, Any], now: float, peer: str) -> None:
        if self.stopping:
            self.out.to_worker(identity, [command(DISCONNECT, reason=REASON_SHUTDOWN)])
            return
        if not keys_match(header.get("key"), self.config.key):
            log.warning("refused worker from %s: wrong or missing key", peer)
            self.out.to_worker(identity, [command(DISCONNECT, reason=REASON_UNAUTHORIZED)])
            return
        announced = read_ready(header)
        if announced is None:
            log.warning("refused worker from %s: READY needs a list of models and a capacity >= 1", peer)
            return
        models, capacity, info = announced
        old = self.workers.get(identity)
        if old is not None:
            self._remove_workers([old], now, reason="announced itself again")
        worker = WorkerState(identity, frozenset(models), capacity, {**info, "peer": peer}, heard=now, started=now)
        self.workers[identity] = worker
        self.workers.seen(models, now)
        log.info("worker %s ready from %s: models %s, capacity %d", worker.name, peer, ", ".join(sorted(models)), capacity)
        self._dispatch_all(models, now)

    def _on_reply(self, worker: WorkerState, header: dict[str, Any], body: list[Any], now: float) -> None:
        rid = header.get("rid")
        request = self.held.dispatched.get(rid) if isinstance(rid, int) and not isinstance(rid, bool) else None
        worker.missed = 0  # it answers: whatever held it up is over
        if request is None or request.worker != worker.identity:
            log.debug("dropped a late or unknown reply (rid %r) from worker %s", rid, worker.name)
            self._after_capacity_change(worker, now)
            return
        self._forget(rid)
        worker.measured(now - request.dispatched)
        status = header.get("status", STATUS_OK)
        if not body:
            self._fail(request, "internal", f"worker {worker.name} sent an empty reply", now)
        else:
            if status == STATUS_OK:
                worker.served += 1
            else:
                worker.failed += 1
            self.held.release(request)
            self.out.to_client(request.client, body)
            self.stats.answered(request.op, request.model, str(status), now - request.received, worker.name)
            if log.isEnabledFor(logging.DEBUG):
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
            self.workers.seen(worker.models, now)
            level = logging.INFO if reason == "drained" else logging.WARNING
            log.log(level, "worker %s removed (%s); %d requests in flight", worker.name, reason, len(worker.in_flight))
            for rid in list(worker.in_flight):
                request = self.held.dispatched.pop(rid)
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
                self.held.enqueue(request, front=True)  # oldest first, ahead of newer work
        self._dispatch_all(models, now)

    # ------------------------------------------------------------------ replies and shutdown

    def _fail(self, request: HeldRequest, code: str, message: str, now: float, *, details: dict[str, Any] | None = None) -> None:
        self.held.release(request)
        self.out.error(request.client, request.id, code, message, request.received, now, peer=request.peer, op=request.op, model=request.model, details=details)

    def _finish_stop(self) -> None:
        for rid in list(self.held.dispatched):
            request = self.held.dispatched[rid]
            self._forget(rid)
            self._fail(request, "overloaded", "the broker shut down before the worker answered; retry in a moment", self._stop_by)
        for worker in self.workers.values():
            self.out.to_worker(worker.identity, [command(DISCONNECT, reason=REASON_SHUTDOWN)])
        self.finished = True
        log.info("broker stopped")

    # ------------------------------------------------------------------ health

    def health(self, now: float) -> dict[str, Any]:
        held = self.held
        return {
            "status": "stopping" if self.stopping else "ok",
            "version": __version__,
            "uptime_s": round(now - self.started, 3),
            "queued": {m: len(q) for m, q in held.queues.items() if q},
            "queued_total": held.queued,
            "queued_bytes": held.queued_bytes,
            "queue_limit": self.config.max_queue,
            "in_flight": len(held.dispatched),
            "models": self.workers.served_models(),
            "workers": [w.health(now, self.workers.recent_s) for w in self.workers.values()],
        }
