"""The ``Worker``: its lifecycle and the I/O loop over its broker links.

Only the I/O loop touches ZeroMQ. Requests are admitted here
(``zdepth.worker.admission``), handed to the compute side
(``zdepth.worker.compute``) and their replies, coming back through a queue
with a wake-up byte, sent on the link each came from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import socket
import time
from typing import Any

import zmq

from zdepth import protocol
from zdepth.config import DEFAULT_MAX_BATCH, WorkerConfig
from zdepth.errors import BadRequest, ConfigError, ServiceError, Unauthorized
from zdepth.metrics import WorkerMetrics, cuda_memory
from zdepth.metrics import serve as serve_metrics
from zdepth.protocol.curve import apply_client
from zdepth.wakeup import Wakeup
from zdepth.worker.admission import admit, check_held, max_pixels
from zdepth.worker.compute import Compute
from zdepth.worker.cpu import cpu_plan
from zdepth.worker.decoding import Decoder
from zdepth.worker.engine import Engine, check_engine
from zdepth.worker.link import BrokerLink
from zdepth.worker.messages import error_frames, ready_frame
from zdepth.worker.task import Task, parse_request
from zdepth.worker.traffic import Traffic

__all__ = ["Worker"]

logger = logging.getLogger("zdepth.worker")

FLUSH_LINGER_MS = 1000  # after a drain, how long close() may spend sending the last replies
DRAIN_GRACE_S = 0.25  # after DISCONNECT, requests the broker sent before reading it may still arrive
MAX_READS_PER_WAKE = 64  # broker messages read before replies get their turn again


class Worker:
    """Serves its brokers until ``stop()``; one instance, one ``run()``.

    Each broker in ``config.brokers`` gets its own connection (a
    ``BrokerLink``): READY, heartbeats, liveness, reconnects with back-off
    and the handshake's outcome are per broker, and a task's reply goes back
    on the link it came from (unless that link has reconnected since). A
    broker that dies or freezes costs only the requests it had sent; the
    others are served throughout, and the worker rejoins it when it is back.

    Each broker is announced the full ``config.effective_capacity``, not a
    share: a broker that is down or idle would otherwise strand its share of
    the device, and a share of a small capacity rounds to nothing. So with n
    brokers up to n x capacity requests may wait at the worker; the held-bytes
    bound (``max_held_bytes``, past it: overloaded) protects its memory, and
    each request's deadline bounds its wait (past it: timeout, before any
    inference is spent on it).

    ``engine`` is injectable (tests, or a custom engine); by default a
    ``zdepth.engine.Engine`` is built from ``config``. It meets
    ``zdepth.worker.engine.Engine`` (``load``, ``infer`` and the attributes
    that say how to drive it); one whose ``staged`` is true also offers
    ``prepare``, ``run`` and ``collect`` and has its batches pipelined step by step.
    """

    def __init__(self, config: WorkerConfig, *, engine: Engine | None = None) -> None:
        # A CPU worker that runs the model itself (no injected engine), or one told its threads, plans its cores.
        cpu = config.device == "cpu" and (engine is None or config.threads is not None)
        self.cpu_plan = cpu_plan(config) if cpu else None
        max_batch = config.max_batch or (self.cpu_plan.max_batch if self.cpu_plan else DEFAULT_MAX_BATCH)
        self.config = config = dataclasses.replace(config, max_batch=max_batch)
        if engine is not None:
            check_engine(engine)
        self._engine = engine if engine is not None else _build_engine(config)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{config.device}"
        self._max_pixels = max_pixels(config)
        if config.curve is not None:
            _check_curve(config)
        self._wakeup = Wakeup()
        self._ctx = zmq.Context()
        self._links: list[BrokerLink] = []  # one per broker in config.brokers, made once the models are loaded
        self._held_tasks: set[Task] = set()  # the tasks _outstanding counts (I/O loop only)
        self._poller = zmq.Poller()
        self._outstanding = 0  # tasks handed to the compute thread and not yet returned (I/O loop only)
        self._held_bytes = 0  # their held_bytes, bounded by config.max_held_bytes (I/O loop only)
        # Plain flags, not locks: stop() may run inside a signal handler on the I/O loop's own thread.
        self._stop_requested = False
        self._abort = False
        self._draining = False
        self._drain_grace_end = math.inf
        self.serving = False
        self._traffic = Traffic()
        self._metrics: WorkerMetrics | None = None
        self._metrics_server = None
        if config.metrics_port is not None:
            self._metrics = WorkerMetrics(config.models, name=self.name, device=config.device)
            self._metrics.read_held(lambda: (self._outstanding, self._held_bytes))
        self._decoder = Decoder(self._engine, max_pixels=self._max_pixels, metrics=self._metrics)
        self._compute = Compute(
            self._engine, config, name=self.name, cpu_plan=self.cpu_plan, traffic=self._traffic, metrics=self._metrics, wakeup=self._wakeup
        )
        self._summary_at = math.inf
        self._summary_from = 0.0

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Load and warm the models, then serve every broker until ``stop()``.

        Raises Unauthorized once every broker has refused the key or
        certificate (one that refuses while others serve is given up alone,
        with an error in the log), and whatever the engine raises while
        loading (WeightsNotFound, UnknownModel, ...).
        """
        # Loading, warm-up and every forward pass happen on the compute thread: CUDA graphs and
        # compiled code stay on one thread (the prepare and reply threads only upload and copy back).
        compute = self._compute
        graceful = False
        try:
            if self._metrics is not None:  # first: a port in use fails at once, not after minutes of loading
                self._metrics_server = serve_metrics(self.config.metrics_port, self._metrics.registry)
            compute.start()
            compute.loaded.wait()
            if compute.load_error is not None:
                raise compute.load_error
            if self._metrics is not None and self.config.device.startswith("cuda"):
                self._metrics.read_device_memory(cuda_memory(_said(self._engine.device, self.config.device) or self.config.device))
            if self._stop_requested:
                graceful = True
                return
            threads = self.cpu_plan.threads if self.cpu_plan else None
            device, precision = _said(self._engine.device, self.config.device), _said(self._engine.precision, self.config.precision)
            ready = ready_frame(self.config, name=self.name, device=device, precision=precision, threads=threads)
            self._links = [BrokerLink(self._ctx, self.config, endpoint, ready, self._poller) for endpoint in self.config.brokers]
            graceful = self._serve()
        finally:
            self._abort = compute.abort = self._abort or not graceful
            compute.stop(graceful=graceful)
            self.serving = False
            for link in self._links:
                flush = graceful and link.answered
                link.close(linger_ms=FLUSH_LINGER_MS if flush else 0)
            self._ctx.term()
            self._wakeup.close()
            self._decoder.shutdown()
            if self._metrics_server is not None:
                self._metrics_server.close()

    def stop(self) -> None:
        """Drain: tell the broker to send no more, answer everything held, then return from run().

        A second call stops at once, abandoning what is held. Safe from any
        thread and from a signal handler.
        """
        if self._stop_requested:
            self._abort = self._compute.abort = True
        self._stop_requested = True
        self._wakeup.set()

    # ------------------------------------------------------------------ I/O loop

    @property
    def _link(self) -> BrokerLink | None:
        """The first broker's link (the only one with a single broker)."""
        return self._links[0] if self._links else None

    def _serve(self) -> bool:
        """The I/O loop over every broker link; True after a completed drain, False after an abort."""
        links = self._links
        self._wakeup.register(self._poller)
        self.serving = True
        self._summary_from = time.monotonic()
        self._summary_at = self._summary_from + self.config.summary_interval_s
        while True:
            now = time.monotonic()
            if self._abort:
                self._log_summary(now)
                logger.warning("stopping at once; %d requests abandoned", self._outstanding)
                return False
            if self._stop_requested and not self._draining:
                self._begin_drain()
            if self._draining and self._outstanding == 0 and (all(link.sock is None for link in links) or now >= self._drain_grace_end):
                self._log_summary(now)
                logger.info("drained; worker %s stopped", self.name)
                return True
            if now >= self._summary_at:
                self._log_summary(now)
            for link in links:
                self._keep_link(link, now)
            wake_at = min(min(link.next_event(reconnecting=not self._draining) for link in links), self._summary_at)
            if self._draining and self._outstanding == 0:
                wake_at = min(wake_at, self._drain_grace_end)
            timeout_ms = max(0.0, wake_at - now) * 1000
            events = dict(self._poller.poll(None if math.isinf(timeout_ms) else math.ceil(timeout_ms)))
            self._wakeup.woken(events)
            self._send_results()
            for link in links:
                try:
                    if link.monitor is not None and link.monitor in events:
                        link.take_events(time.monotonic())
                    if link.sock is not None and link.sock in events:
                        self._read_broker(link)
                except Unauthorized as exc:
                    self._refused(link, exc)

    def _refused(self, link: BrokerLink, exc: Unauthorized) -> None:
        """A broker refused the key or certificate: final for that broker (a setting to fix, not a fault
        that retrying cures). The worker goes on serving the other brokers; when every one has refused
        it, run() raises ``exc``."""
        link.refused = True
        link.close()
        if all(other.refused for other in self._links):
            raise exc
        serving = [other.endpoint for other in self._links if not other.refused]
        logger.error("%s; serving only %s from now on", exc, ", ".join(serving))

    def _log_summary(self, now: float) -> None:
        line = self._traffic.summary(now - self._summary_from)
        if line is not None:
            logger.info("%s", line)
        self._summary_from, self._summary_at = now, now + self.config.summary_interval_s

    def _keep_link(self, link: BrokerLink, now: float) -> None:
        """Connect when due, give up on a silent broker, send heartbeats."""
        if link.refused:
            return
        if link.sock is None and not self._draining and now >= link.reconnect_at:
            link.connect(now)
        elif link.sock is not None and now >= link.expires_at:
            held = sum(1 for task in self._held_tasks if task.link is link)
            if self._draining:
                link.close()
                logger.warning("broker %s silent while draining; %d replies to it will be lost", link.endpoint, held)
            else:
                answered_before = link.answered
                delay = link.drop(now)
                hint = ""
                if self.config.curve is not None and not answered_before:
                    hint = " (it never answered: with CurveZMQ, check that this worker's public key is in the broker's allow directory)"
                lost = f"; {held} requests from it abandoned (the broker re-queues them)" if held else ""
                logger.warning(
                    "broker %s silent for %.1f s; reconnecting in %.2f s%s%s", link.endpoint, self.config.heartbeat.expiry_s, delay, lost, hint
                )  # fmt: skip
        link.heartbeat_if_due(now)

    def _read_broker(self, link: BrokerLink) -> None:
        for _ in range(MAX_READS_PER_WAKE):
            if link.sock is None:
                return
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(link, frames)

    def _on_message(self, link: BrokerLink, frames: list[zmq.Frame]) -> None:
        now = time.monotonic()
        try:
            header = protocol.parse_command(frames[0].buffer)
        except BadRequest as exc:
            link.heard(now)
            logger.warning("ignored a malformed message from broker %s: %s", link.endpoint, exc)
            return
        cmd = header["cmd"]
        if not link.answered and cmd != protocol.DISCONNECT:
            logger.info(
                "registered with broker %s: serving %s, capacity %d",
                link.endpoint, ", ".join(self.config.models), self.config.effective_capacity,
            )  # fmt: skip
        link.heard(now, healthy=cmd != protocol.DISCONNECT)
        if cmd == protocol.REQUEST:
            self._on_request(link, header, frames[1:], now)
        elif cmd == protocol.DISCONNECT:
            self._on_disconnect(link, header.get("reason"), now)
        elif cmd != protocol.HEARTBEAT:
            logger.warning("ignored unknown command %r from broker %s", cmd, link.endpoint)

    def _on_request(self, link: BrokerLink, header: dict[str, Any], body: list[zmq.Frame], now: float) -> None:
        """Queue the task for the compute thread, or fail it here if it is malformed."""
        rid = header.get("rid")
        if rid is None:
            logger.warning("ignored a REQUEST without 'rid' (request id %r)", header.get("id"))
            return
        request_id = header.get("id") if isinstance(header.get("id"), str) else None
        try:
            task = parse_request(
                header, body, models=self.config.models, now=now, generation=link.generation, max_image_bytes=self.config.max_message_bytes
            )
        except ServiceError as exc:
            self._refuse(link, rid, request_id, exc.code, exc.message, now)
            return
        except Exception as exc:  # a bug in a parser fails this request, never the worker
            logger.exception("parsing request %r failed", request_id)
            self._refuse(link, rid, request_id, "internal", f"the worker could not parse the request: {type(exc).__name__}", now)
            return
        task.link = link
        try:
            # Everything the header can tell is checked before decoding starts: a request that would be
            # refused anyway never costs a decode, and the decode's peak bytes are counted up front.
            task.held_bytes = admit(task, max_pixels=self._max_pixels, max_message_bytes=self.config.max_message_bytes)
            check_held(self._held_bytes, self._outstanding, task.held_bytes, self.config.max_held_bytes)
        except ServiceError as exc:
            self._refuse(link, rid, request_id, exc.code, exc.message, now)
            return
        task.decoded = self._decoder.decode(task.image)
        self._outstanding += 1
        self._held_bytes += task.held_bytes
        self._held_tasks.add(task)
        self._compute.tasks.put(task)

    def _refuse(self, link: BrokerLink, rid: Any, request_id: str | None, code: str, message: str, received: float) -> None:
        """Answer a request from the I/O loop, before it reached the compute side."""
        link.send(error_frames(rid, request_id, code, message))
        seconds = time.monotonic() - received
        self._traffic.reply(code, seconds * 1000)
        if self._metrics is not None:
            self._metrics.request_done(None, None, code, seconds)
        logger.debug("request %r (rid %r): %s: %s", request_id, rid, code, message)

    def _on_disconnect(self, link: BrokerLink, reason: Any, now: float) -> None:
        if reason == protocol.REASON_UNAUTHORIZED:
            raise Unauthorized(
                f"broker {link.endpoint} refused this worker: wrong or missing key. "
                "Give the broker's key with --key-file or ZDEPTH_KEY (the key the broker was started with)"
            )
        if self._draining:
            logger.debug("broker %s sent DISCONNECT %r while draining; ignored", link.endpoint, reason)
            return
        delay = link.drop(now)
        logger.warning("broker %s sent DISCONNECT %r; announcing again in %.2f s", link.endpoint, reason, delay)

    def _begin_drain(self) -> None:
        """Tell every broker to send no more; the loop returns once all that is held is answered."""
        self._draining = True
        self._drain_grace_end = time.monotonic() + DRAIN_GRACE_S
        told = [link.endpoint for link in self._links if link.send([protocol.command(protocol.DISCONNECT, reason="draining")])]
        logger.info("draining: finishing %d requests; told %s to send no more", self._outstanding, ", ".join(told) or "no broker (none connected)")

    def _send_results(self) -> None:
        """Send what the compute thread finished, each to the broker it came from; results for a
        connection dropped since the request came are abandoned."""
        while True:
            try:
                task, frames = self._compute.results.get_nowait()
            except queue.Empty:
                return
            self._outstanding -= 1
            self._held_bytes -= task.held_bytes
            self._held_tasks.discard(task)
            link = task.link
            if frames is not None and task.generation == link.generation:
                link.send(frames)
                seconds = time.monotonic() - task.received
                latency_ms = seconds * 1000
                self._traffic.reply(task.status, latency_ms)
                if self._metrics is not None:
                    self._metrics.request_done(task.op, task.model, task.status, seconds)
                logger.debug("request %r (rid %r): %s in %.1f ms", task.request_id, task.rid, task.status, latency_ms)



def _said(value: object, fallback: object) -> str | None:
    """What the engine says of itself (device, precision) for READY and the metrics, else the config's; None if neither does."""
    value = fallback if value is None else value
    return None if value is None else str(value)


def _build_engine(config: WorkerConfig) -> Engine:
    from zdepth.engine.inference import Engine  # torch is imported only when a worker really starts

    try:
        return Engine(
            device=config.device,
            precision=config.precision,
            weights_dir=config.weights_dir,
            download=config.download,
            compile=config.compile,
            cuda_graphs=config.device.startswith("cuda") if config.cuda_graphs is None else config.cuda_graphs,
            gpu_decode=config.gpu_decode,
        )
    except ValueError as exc:  # bad device or precision, CUDA graphs off CUDA
        raise ConfigError(str(exc)) from exc


def _check_curve(config: WorkerConfig) -> None:
    """Read the CurveZMQ certificates now, so a bad path fails before minutes of model loading."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as probe:
        probe.linger = 0
        apply_client(probe, config.curve)
