"""The broker's sockets: clients on one ROUTER, workers on another, and a loop that feeds BrokerCore.

Everything the broker decides lives in ``core.py``; this module receives
frames, hands them to the core with the time, and sends what the core returns.
Body frames (images, arrays) go from one socket to the other without being
decoded or copied. A send that fails here is reported back to the core, so a
vanished worker costs its requests nothing and a client that stops reading
loses only its own replies.

With ``metrics_port`` set, ``zdepth.metrics`` is imported and served on that
port; the loop only tells it of dispatches and hands it the core's state when
a scrape asks (see BrokerMetrics).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq

from zdepth.broker.core import BrokerCore
from zdepth.broker.outbox import CLIENT, Outgoing
from zdepth.config import BrokerConfig
from zdepth.protocol.auth import apply_broker_security, start_broker_auth

log = logging.getLogger("zdepth.broker")

TICK_MS = 50  # longest the loop sleeps: bounds stop() latency and timer drift when idle
TICK_EVERY_S = 0.005  # under traffic, timers are checked this often, not after every message
FLUSH_LINGER_MS = 1000  # on exit, how long unsent replies may take to leave
BATCH = 256  # messages read from one socket before the other gets a turn
SUMMARY_PERIOD_S = 10.0  # one INFO line of traffic per period


PEERS_REMEMBERED = 65_536  # routing ids whose address is kept; past this the table starts again


class PeerAddresses:
    """The network address behind each routing id, asked of libzmq once per id, not on every message.

    A ROUTER gives each connection a routing id of its own, so the address of
    an id does not change; only the table's size needs a bound.
    """

    def __init__(self) -> None:
        self._known: dict[bytes, str] = {}

    def __call__(self, identity: bytes, frame: zmq.Frame) -> str:
        address = self._known.get(identity)
        if address is None:
            if len(self._known) >= PEERS_REMEMBERED:
                self._known.clear()
            try:
                address = frame.get("Peer-Address")
            except (zmq.ZMQError, AttributeError):
                address = "local"
            self._known[identity] = address
        return address


def _recv_message(sock: zmq.Socket) -> list[zmq.Frame]:
    """One whole multipart message, without blocking (it is known to be there)."""
    frames = [sock.recv(zmq.NOBLOCK, copy=False)]
    while frames[-1].more:
        frames.append(sock.recv(zmq.NOBLOCK, copy=False))
    return frames


class Broker:
    """``bind()``, then ``run()`` (blocking); ``stop()`` from any thread; ``close()`` or ``with`` frees the sockets."""

    def __init__(self, config: BrokerConfig, *, context: zmq.Context | None = None, metrics_host: str = "0.0.0.0") -> None:
        self.config = config
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._auth = None
        self._clients = self._workers = None
        self._metrics = self._metrics_server = None
        try:
            self._auth = start_broker_auth(self._context, key=config.key, curve=config.curve)
            self._clients = self._router(hwm=config.client_reply_hwm)
            self._workers = self._router(hwm=10_000)
        except BaseException:
            self.close()
            raise
        self._stop = threading.Event()
        self._peers = PeerAddresses()
        self.core = BrokerCore(config, time.monotonic())
        self.client_endpoint = ""
        self.worker_endpoint = ""
        self.metrics_host = metrics_host
        if config.metrics_port is not None:
            from zdepth.metrics import BrokerMetrics  # prometheus_client only when metrics are on

            try:
                self._metrics = BrokerMetrics(self.core)
            except BaseException:
                self.close()
                raise

    def _router(self, *, hwm: int) -> zmq.Socket:
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer raises instead of vanishing
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        apply_broker_security(sock, key=self.config.key, curve=self.config.curve)
        return sock

    def bind(self) -> tuple[str, str]:
        """Bind both sockets; returns the endpoints actually bound (port 0 picks a free one)."""
        self._clients.bind(self.config.clients)
        self._workers.bind(self.config.workers)
        self.client_endpoint = self._clients.getsockopt_string(zmq.LAST_ENDPOINT)
        self.worker_endpoint = self._workers.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.key is None and self.config.curve is None:
            log.warning("no key set: any client and worker that can reach the broker is accepted")
        elif self.config.curve is None:
            log.info("peers prove the key at the handshake (PLAIN); CurveZMQ is off, so keys and images cross the network in clear")
        if self._metrics is not None and self._metrics_server is None:
            from zdepth.metrics import serve

            self._metrics_server = serve(self.config.metrics_port, self._metrics.registry, self.metrics_host)
        log.info("broker listening: clients %s, workers %s", self.client_endpoint, self.worker_endpoint)
        return self.client_endpoint, self.worker_endpoint

    @property
    def metrics_url(self) -> str | None:
        """Where the metrics are served once bound (None: metrics off)."""
        return None if self._metrics_server is None else self._metrics_server.url

    def stop(self) -> None:
        """Ask ``run()`` to drain and return; safe from any thread or a signal handler."""
        self._stop.set()

    def close(self) -> None:
        """Close the metrics exporter, the sockets (letting the last replies leave), the authenticator and our own context."""
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        for sock in (self._clients, self._workers):
            if sock is not None and not sock.closed:
                sock.close(linger=FLUSH_LINGER_MS)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context and not self._context.closed:
            self._context.term()

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        return self.core.health(time.monotonic())

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Serve until ``stop()``, then drain: answer what arrives, await what is in flight, tell workers."""
        if not self.client_endpoint:
            self.bind()
        sockets = [(self._workers, zmq.POLLIN), (self._clients, zmq.POLLIN)]
        core, metrics = self.core, self._metrics
        next_tick = 0.0
        next_summary = time.monotonic() + SUMMARY_PERIOD_S
        try:
            while not core.finished:
                if self._stop.is_set() and not core.stopping:
                    self._send(core.stop(time.monotonic()))
                for sock, _ in zmq.zmq_poll(sockets, TICK_MS):
                    self._read(sock, core.worker_message if sock is self._workers else core.client_message)
                now = time.monotonic()
                if now < next_tick:
                    continue  # messages come faster than timers need checking: serve them first
                next_tick = now + TICK_EVERY_S
                self._send(core.tick(now))
                if metrics is not None:
                    metrics.serve_snapshot(now)
                if now >= next_summary:
                    line = core.stats.summary(now - next_summary + SUMMARY_PERIOD_S)
                    if line:
                        log.info("%s", line)
                    next_summary = now + SUMMARY_PERIOD_S
        finally:
            self.close()

    def _read(self, sock: zmq.Socket, handler) -> None:
        """Handle what is waiting now, a bounded number at a time so neither side starves."""
        for _ in range(BATCH):
            frames = _recv_message(sock)
            if len(frames) >= 2:  # an identity alone has nothing to answer
                identity = frames[0].bytes
                try:
                    out = handler(identity, frames[1:], time.monotonic(), self._peers(identity, frames[1]))
                except Exception:  # one bad message must never take the broker down
                    log.exception("unexpected error handling a message; dropped it")
                else:
                    self._send(out)
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return  # asked after sending, so a reply never waits on this check

    def _send(self, out: list[Outgoing]) -> None:
        """Send the core's messages in order; report failed sends back to it (which may add more)."""
        i = 0
        while i < len(out):
            message = out[i]
            i += 1
            sock = self._clients if message.to == CLIENT else self._workers
            try:
                sock.send_multipart([message.identity, *message.frames], flags=zmq.NOBLOCK, copy=False)
                if message.rid is not None and self._metrics is not None:
                    self._metrics.dispatched(self.core.held.dispatched.get(message.rid))
            except zmq.ZMQError as exc:
                if message.to == CLIENT:
                    # Gone (EHOSTUNREACH) or not reading (its queue is at the high-water mark): its loss alone.
                    log.debug("reply to client %s dropped: %s", message.identity.hex(), exc)
                    self.core.client_unreachable(message.identity)
                    continue
                log.debug("message to worker %s failed: %s", message.identity.hex(), exc)
                unsent = [m.rid for m in out[i - 1:] if m.to != CLIENT and m.identity == message.identity and m.rid is not None]
                rest = [m for m in out[i:] if not (m.to != CLIENT and m.identity == message.identity)]
                out = rest + self.core.worker_unreachable(message.identity, unsent, time.monotonic())
                i = 0


def run_broker(config: BrokerConfig) -> None:
    """Bind, serve until stopped; for the CLI."""
    with Broker(config) as broker:
        broker.bind()
        broker.run()
