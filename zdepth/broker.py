"""The broker: clients on one ROUTER, workers on another, requests routed by model.

It stays dumb on purpose. It reads only the small header of each message,
checks the key in constant time, and forwards body frames (images, arrays) to
a worker and back without decoding or copying them. Around that it keeps the
bookkeeping that makes the system reliable: which workers are alive
(heartbeats), which models they serve, how loaded each is, which requests are
in flight where, and when each request's deadline passes. Every request gets
exactly one reply: a result relayed from a worker, or an error made here.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import __version__
from .config import BrokerConfig
from .curve import apply_server, start_authenticator
from .errors import BadRequest
from .protocol import (
    DISCONNECT,
    HEARTBEAT,
    MODEL_OPS,
    OP_HEALTH,
    READY,
    REASON_SHUTDOWN,
    REASON_UNAUTHORIZED,
    REASON_UNKNOWN_WORKER,
    REPLY,
    REQUEST,
    STATUS_OK,
    RequestHeader,
    command,
    error_header,
    keys_match,
    op_accepts_model,
    parse_command,
    parse_request_header,
    peek_request_id,
    reply_header,
)

log = logging.getLogger(__name__)

TICK_S = 0.05  # longest the loop sleeps: bounds stop() latency and timer drift
IN_FLIGHT_GRACE_S = 1.0  # a dispatched request past its deadline gets this long before the broker answers for it
FLUSH_LINGER_MS = 1000  # on exit, how long unsent replies may take to leave
MAX_ATTEMPTS = 2  # a request whose worker dies is re-queued once, then fails with worker_lost


@dataclass
class Job:
    """A client request held by the broker; ``body`` frames are forwarded untouched."""

    client: bytes
    header: RequestHeader
    model: str
    body: list[zmq.Frame]
    peer: str
    received: float
    deadline: float
    attempts: int = 0
    rid: int | None = None
    worker: bytes | None = None
    size: int = 0  # body bytes, counted against BrokerConfig.max_queue_bytes while queued


@dataclass
class WorkerState:
    identity: bytes
    models: frozenset[str]
    capacity: int
    info: dict[str, Any]
    expires: float
    started: float
    in_flight: dict[int, Job] = field(default_factory=dict)
    draining: bool = False
    served: int = 0
    failed: int = 0

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.identity.hex())

    @property
    def load(self) -> float:
        return len(self.in_flight) / self.capacity


def _peer_address(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return "local"


class Broker:
    """Run with ``run()`` (blocking) after ``bind()``; ``stop()`` may be called from any thread."""

    def __init__(self, config: BrokerConfig, *, context: zmq.Context | None = None) -> None:
        self.config = config
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._auth = start_authenticator(self._context, config.curve) if config.curve else None
        self._clients = self._router(config.max_message_bytes)
        self._workers = self._router(config.max_message_bytes)
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._workers_by_id: dict[bytes, WorkerState] = {}
        self._queues: dict[str, collections.deque[Job]] = collections.defaultdict(collections.deque)
        self._queued = 0
        self._queued_bytes = 0
        self._dispatched: dict[int, Job] = {}
        self._rids = itertools.count(1)
        self._model_last_seen: dict[str, float] = {}
        self._next_heartbeat = 0.0
        self.client_endpoint = ""
        self.worker_endpoint = ""

    def _router(self, max_message_bytes: int) -> zmq.Socket:
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises instead of vanishing
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        if self.config.curve:
            apply_server(sock, self.config.curve)
        return sock

    def bind(self) -> tuple[str, str]:
        """Bind both sockets; returns the endpoints actually bound (port 0 picks a free one)."""
        self._clients.bind(self.config.clients)
        self._workers.bind(self.config.workers)
        self.client_endpoint = self._clients.getsockopt_string(zmq.LAST_ENDPOINT)
        self.worker_endpoint = self._workers.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.key is None:
            log.warning("no key set: any client and worker that can reach the broker is accepted")
        if self.config.curve is None:
            log.info("CurveZMQ is off: keys and images cross the network in clear")
        log.info("broker listening: clients %s, workers %s", self.client_endpoint, self.worker_endpoint)
        return self.client_endpoint, self.worker_endpoint

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        if not self.client_endpoint:
            self.bind()
        poller = zmq.Poller()
        poller.register(self._clients, zmq.POLLIN)
        poller.register(self._workers, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(TICK_S * 1000))
                if events.get(self._workers):
                    self._drain_socket(self._workers, self._on_worker_message)
                if events.get(self._clients):
                    self._drain_socket(self._clients, self._on_client_message)
                self._on_tick(time.monotonic())
            self._shutdown(poller)
        finally:
            # Linger so the last replies (shutdown errors included) leave before the process does.
            self._clients.close(linger=FLUSH_LINGER_MS)
            self._workers.close(linger=FLUSH_LINGER_MS)
            if self._auth is not None:
                self._auth.stop()
            if self._own_context:
                self._context.term()

    def _drain_socket(self, sock: zmq.Socket, handler) -> None:
        """Handle what is waiting now, a bounded number at a time so neither side starves."""
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # one bad message must never take the broker down
                log.exception("unexpected error handling a message; dropped it")

    def _on_tick(self, now: float) -> None:
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat.interval_s
            for worker in list(self._workers_by_id.values()):
                self._send_worker(worker.identity, [command(HEARTBEAT)])
        for worker in list(self._workers_by_id.values()):
            if worker.expires < now:
                self._remove_worker(worker, reason="heartbeat expired")
        self._expire_queued(now)
        self._expire_in_flight(now)
        self._fail_unservable(now)

    # ------------------------------------------------------------------ clients

    def _on_client_message(self, frames: list[zmq.Frame]) -> None:
        now = time.monotonic()
        if len(frames) < 2:
            return  # a lone identity frame: nothing to answer
        client, head, body = frames[0].bytes, frames[1], frames[2:]
        peer = _peer_address(head)
        try:
            header = parse_request_header(head.buffer)
        except BadRequest as exc:
            request_id = peek_request_id(head.buffer)
            self._reply_error(client, request_id, "bad_request", str(exc), peer=peer, op="?", model=None, started=now)
            return
        if not keys_match(header.key, self.config.key):
            self._reply_error(client, header.id, "unauthorized", "wrong or missing key; set ZDEPTH_KEY or pass key=", peer=peer, op=header.op, model=header.model, started=now)
            return
        if header.op == OP_HEALTH:
            self._send_client(client, [reply_header(header.id, health=self.health())])
            log.info("%s op=health status=ok", peer)
            return
        if header.op in MODEL_OPS and len(body) != 2:
            self._reply_error(client, header.id, "bad_request", f"op {header.op!r} needs 2 body frames (params, image), got {len(body)}", peer=peer, op=header.op, model=header.model, started=now)
            return
        model = header.model or self._default_model(header.op)
        if model is None or not self._may_be_served(model, now):
            message, details = self._unknown_model(model, header.op)
            self._reply_error(client, header.id, "unknown_model", message, peer=peer, op=header.op, model=model, started=now, details=details)
            return
        if not op_accepts_model(header.op, model):
            kind = "a relative model such as 'vits'" if header.op == "relative_depth" else "a metric model such as 'vits-hypersim'"
            self._reply_error(client, header.id, "bad_request", f"op {header.op!r} needs {kind}, got {model!r}", peer=peer, op=header.op, model=model, started=now)
            return
        if self._queued >= self.config.max_queue:
            self._reply_error(client, header.id, "overloaded", f"{self._queued} requests are waiting (limit {self.config.max_queue}); retry later or add workers", peer=peer, op=header.op, model=model, started=now)
            return
        size = sum(len(frame) for frame in body)
        if self._queued and self._queued_bytes + size > self.config.max_queue_bytes:
            message = f"{self._queued_bytes} bytes of requests are waiting (limit {self.config.max_queue_bytes}); retry later or add workers"
            self._reply_error(client, header.id, "overloaded", message, peer=peer, op=header.op, model=model, started=now)
            return
        timeout_s = header.timeout_ms / 1000 if header.timeout_ms else self.config.default_timeout_s
        job = Job(client=client, header=header, model=model, body=body, peer=peer, received=now, deadline=now + timeout_s, size=size)
        self._enqueue(job)
        self._dispatch(model)

    def _served_models(self) -> list[str]:
        return sorted({m for w in self._workers_by_id.values() if not w.draining for m in w.models})

    def _unknown_model(self, model: str | None, op: str) -> tuple[str, dict[str, Any]]:
        """The message and details of an unknown_model error: what is served instead."""
        served = self._served_models()
        hint = f"served models: {', '.join(served)}" if served else "no worker is connected"
        return f"no worker serves model {model or '(default)'!r} for op {op!r}; {hint}", {"served": served}

    def _default_model(self, op: str) -> str | None:
        """The server's default when a request names no model: the first served model that fits the op."""
        return next((m for m in self._served_models() if op_accepts_model(op, m)), None)

    def _may_be_served(self, model: str, now: float) -> bool:
        """Served now (draining workers included), or recently enough that its workers are probably
        reconnecting or restarting: such requests wait in the queue instead of failing at once."""
        if any(model in w.models for w in self._workers_by_id.values()):
            return True
        grace = self.config.reconnect_grace_s
        if now - self._started < grace:
            return True
        return now - self._model_last_seen.get(model, -grace) < grace

    def _reply_error(
        self,
        client: bytes,
        request_id: str | None,
        code: str,
        message: str,
        *,
        peer: str,
        op: str,
        model: str | None,
        started: float,
        details: dict[str, Any] | None = None,
    ) -> None:
        self._send_client(client, [error_header(request_id, code, message, details)])
        self._log_request(peer, op, model, code, started, worker=None)

    def _log_request(self, peer: str, op: str, model: str | None, status: str, started: float, worker: str | None) -> None:
        level = logging.INFO if status in (STATUS_OK, "bad_request", "unknown_model") else logging.WARNING
        log.log(level, "%s op=%s model=%s status=%s latency_ms=%.2f worker=%s", peer, op, model, status, 1000 * (time.monotonic() - started), worker or "-")

    def _send_client(self, client: bytes, frames: list) -> None:
        try:
            self._clients.send_multipart([client, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # client gone (EHOSTUNREACH) or its queue full: the reply has nowhere to go
            log.debug("reply to a departed client dropped: %s", exc)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, model: str) -> None:
        """Send queued requests for ``model`` to the least-loaded workers with spare capacity."""
        queue = self._queues.get(model)
        now = time.monotonic()
        while queue:
            candidates = [w for w in self._workers_by_id.values() if model in w.models and not w.draining and len(w.in_flight) < w.capacity]
            if not candidates:
                return
            job = self._dequeue(queue)
            if job.deadline <= now:
                self._fail(job, "timeout", "the deadline passed while the request waited for a worker")
                continue
            worker = min(candidates, key=lambda w: w.load)
            job.rid, job.worker = next(self._rids), worker.identity
            job.attempts += 1
            worker.in_flight[job.rid] = job
            self._dispatched[job.rid] = job
            header = command(
                REQUEST,
                rid=job.rid,
                id=job.header.id,
                op=job.header.op,
                model=model,
                timeout_ms=max(1.0, 1000 * (job.deadline - now)),
                client=job.peer,
            )
            self._send_worker(worker.identity, [header, *job.body])

    def _enqueue(self, job: Job, *, front: bool = False) -> None:
        """Queue ``job`` for its model, counting it against the queue's limits."""
        queue = self._queues[job.model]
        if front:
            queue.appendleft(job)
        else:
            queue.append(job)
        self._queued += 1
        self._queued_bytes += job.size

    def _dequeue(self, queue: collections.deque[Job]) -> Job:
        job = queue.popleft()
        self._count_out(job)
        return job

    def _count_out(self, job: Job) -> None:
        self._queued -= 1
        self._queued_bytes -= job.size

    def _fail(self, job: Job, code: str, message: str) -> None:
        self._reply_error(job.client, job.header.id, code, message, peer=job.peer, op=job.header.op, model=job.model, started=job.received)

    def _expire_queued(self, now: float) -> None:
        for queue in self._queues.values():
            if queue and any(job.deadline <= now for job in queue):
                keep = collections.deque()
                for job in queue:
                    if job.deadline <= now:
                        self._count_out(job)
                        self._fail(job, "timeout", "the deadline passed while the request waited for a worker")
                    else:
                        keep.append(job)
                queue.clear()
                queue.extend(keep)

    def _fail_unservable(self, now: float) -> None:
        """Requests held for a model whose workers did not come back in time fail with unknown_model."""
        for model, queue in self._queues.items():
            if queue and not self._may_be_served(model, now):
                while queue:
                    job = self._dequeue(queue)
                    message, details = self._unknown_model(model, job.header.op)
                    self._reply_error(job.client, job.header.id, "unknown_model", message, peer=job.peer, op=job.header.op, model=model, started=job.received, details=details)

    def _expire_in_flight(self, now: float) -> None:
        """Answer for a worker that holds a request far past its deadline; its late reply is then dropped."""
        for rid, job in list(self._dispatched.items()):
            if job.deadline + IN_FLIGHT_GRACE_S <= now:
                self._forget(rid)
                self._fail(job, "timeout", "the worker did not answer before the deadline")

    def _forget(self, rid: int) -> Job | None:
        job = self._dispatched.pop(rid, None)
        if job is not None:
            worker = self._workers_by_id.get(job.worker)
            if worker is not None:
                worker.in_flight.pop(rid, None)
        return job

    # ------------------------------------------------------------------ workers

    def _on_worker_message(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return
        identity, body = frames[0].bytes, frames[2:]
        try:
            header = parse_command(frames[1].buffer)
        except BadRequest as exc:
            log.warning("dropped a malformed message from worker %s: %s", identity.hex(), exc)
            return
        cmd = header["cmd"]
        worker = self._workers_by_id.get(identity)
        if cmd == READY:
            self._on_ready(identity, header, peer=_peer_address(frames[1]))
            return
        if worker is None:
            # Not registered (or forgotten, say after a broker restart): ask it to announce itself again.
            self._send_worker(identity, [command(DISCONNECT, reason=REASON_UNKNOWN_WORKER)])
            return
        worker.expires = time.monotonic() + self.config.heartbeat.expiry_s
        if cmd == REPLY:
            self._on_reply(worker, header, body)
        elif cmd == DISCONNECT:
            log.info("worker %s is draining (%s); %d requests still in flight", worker.name, header.get("reason"), len(worker.in_flight))
            worker.draining = True
            if not worker.in_flight:
                self._remove_worker(worker, reason="drained")
        elif cmd != HEARTBEAT:
            log.warning("worker %s sent unknown command %r; ignored", worker.name, cmd)

    def _on_ready(self, identity: bytes, header: dict[str, Any], *, peer: str) -> None:
        if not keys_match(header.get("key"), self.config.key):
            log.warning("refused worker from %s: wrong or missing key", peer)
            self._send_worker(identity, [command(DISCONNECT, reason=REASON_UNAUTHORIZED)])
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
        old = self._workers_by_id.get(identity)
        if old is not None:
            self._remove_worker(old, reason="announced itself again")
        now = time.monotonic()
        info = {**info, "peer": peer}
        worker = WorkerState(identity, frozenset(models), capacity, info, expires=now + self.config.heartbeat.expiry_s, started=now)
        self._workers_by_id[identity] = worker
        for model in models:
            self._model_last_seen[model] = now
        log.info("worker %s ready from %s: models %s, capacity %d", worker.name, peer, ", ".join(sorted(models)), capacity)
        for model in models:
            self._dispatch(model)

    def _on_reply(self, worker: WorkerState, header: dict[str, Any], body: list[zmq.Frame]) -> None:
        rid = header.get("rid")
        job = self._dispatched.get(rid) if isinstance(rid, int) else None
        if job is None or job.worker != worker.identity:
            log.debug("dropped a late or unknown reply (rid %r) from worker %s", rid, worker.name)
            return
        self._forget(rid)
        status = header.get("status", STATUS_OK)
        if status == STATUS_OK:
            worker.served += 1
        else:
            worker.failed += 1
        if body:
            self._send_client(job.client, body)
        else:
            self._fail(job, "internal", f"worker {worker.name} sent an empty reply")
            return
        self._log_request(job.peer, job.header.op, job.model, str(status), job.received, worker=worker.name)
        if worker.draining and not worker.in_flight:
            self._remove_worker(worker, reason="drained")
        else:
            for model in worker.models:
                self._dispatch(model)

    def _remove_worker(self, worker: WorkerState, *, reason: str) -> None:
        """Forget a worker; what it held is re-queued once, then fails with worker_lost."""
        self._workers_by_id.pop(worker.identity, None)
        now = time.monotonic()
        for model in worker.models:
            self._model_last_seen[model] = now
        lost = sorted(worker.in_flight.values(), key=lambda j: j.received, reverse=True)
        log.log(logging.INFO if reason == "drained" else logging.WARNING, "worker %s removed (%s); %d requests in flight", worker.name, reason, len(lost))
        for job in lost:
            self._dispatched.pop(job.rid, None)
            job.rid = job.worker = None
            if job.attempts >= MAX_ATTEMPTS:
                self._fail(job, "worker_lost", f"the worker died while holding this request, {job.attempts} times; retry, and check the workers' logs")
            else:
                self._enqueue(job, front=True)  # oldest first, ahead of newer work
        for model in {job.model for job in lost}:
            self._dispatch(model)

    def _send_worker(self, identity: bytes, frames: list) -> None:
        try:
            self._workers.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            log.debug("message to worker %s dropped: %s", identity.hex(), exc)

    # ------------------------------------------------------------------ health and shutdown

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "version": __version__,
            "uptime_s": round(now - self._started, 3),
            "queued": {m: len(q) for m, q in self._queues.items() if q},
            "queued_total": self._queued,
            "queued_bytes": self._queued_bytes,
            "queue_limit": self.config.max_queue,
            "in_flight": len(self._dispatched),
            "models": self._served_models(),
            "workers": [
                {
                    **{k: v for k, v in w.info.items() if k in ("name", "host", "pid", "device", "precision", "version", "max_batch", "peer")},
                    "models": sorted(w.models),
                    "capacity": w.capacity,
                    "in_flight": len(w.in_flight),
                    "served": w.served,
                    "failed": w.failed,
                    "draining": w.draining,
                    "uptime_s": round(now - w.started, 3),
                }
                for w in self._workers_by_id.values()
            ],
        }

    def _shutdown(self, poller: zmq.Poller) -> None:
        """Fail what waits in queues, give in-flight requests a moment to finish, then tell workers."""
        for queue in self._queues.values():
            while queue:
                self._fail(self._dequeue(queue), "overloaded", "the broker is shutting down; retry in a moment")
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self._dispatched and time.monotonic() < deadline:
            if dict(poller.poll(TICK_S * 1000)).get(self._workers):
                self._drain_socket(self._workers, self._on_worker_message)
        for rid in list(self._dispatched):
            job = self._forget(rid)
            if job is not None:
                self._fail(job, "worker_lost", "the broker shut down before the worker answered; retry")
        for worker in self._workers_by_id.values():
            self._send_worker(worker.identity, [command(DISCONNECT, reason=REASON_SHUTDOWN)])
        log.info("broker stopped")


def run_broker(config: BrokerConfig) -> None:
    """Bind, serve until stopped; for the CLI."""
    broker = Broker(config)
    broker.bind()
    broker.run()
