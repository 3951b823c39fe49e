"""The worker's DEALER link to one broker, after the ZeroMQ Guide's Paranoid Pirate worker.

A broker silent for ``heartbeat.expiry_s`` is presumed dead: the link closes
its socket, waits with exponential back-off and jitter, connects a fresh one
and announces itself again. Every connect and close starts a new generation,
so that requests from a dropped connection are never answered on the next.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from zdepth import protocol
from zdepth.backoff import backoff_delay
from zdepth.config import WorkerConfig
from zdepth.errors import Unauthorized
from zdepth.protocol import auth

__all__ = ["KEEPALIVE", "BrokerLink"]

logger = logging.getLogger("zdepth.worker")

KEEPALIVE = {zmq.TCP_KEEPALIVE: 1, zmq.TCP_KEEPALIVE_IDLE: 30, zmq.TCP_KEEPALIVE_INTVL: 10, zmq.TCP_KEEPALIVE_CNT: 3}


class BrokerLink:
    """The DEALER to one broker, with heartbeats, liveness and reconnect back-off (Paranoid Pirate).

    The connection proves the key at the ZeroMQ handshake (PLAIN, see
    ``zdepth.protocol.auth``) or uses CurveZMQ. A monitor socket reports how each
    handshake went: a refused key is final (``take_event`` raises
    Unauthorized), and a broker that turns out to take no key at the handshake
    gets a fresh connection without PLAIN (the key then travels in READY only).
    Both sockets are registered with ``poller`` while the link is up.
    """

    EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED

    def __init__(self, ctx: zmq.Context, config: WorkerConfig, endpoint: str, ready: bytes, poller: zmq.Poller) -> None:
        self._ctx, self._config, self._ready, self._poller = ctx, config, ready, poller
        self.endpoint = endpoint
        self.refused = False  # this broker refused the key or certificate: never connected to again
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.generation = 0  # bumped on every connect and close: tasks remember theirs
        self.expires_at = math.inf
        self.next_heartbeat = math.inf
        self.reconnect_at = 0.0
        self.answered = False  # whether the broker spoke on this connection: only then is a flush worth waiting for
        self.plain = config.key is not None  # prove the key at the handshake, until a broker shows it takes none
        self.connected = False  # the current connection's handshake succeeded
        self._failures = 0
        self._connects = 0

    def connect(self, now: float) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        hwm = max(100, 4 * self._config.effective_capacity)
        options = {
            zmq.LINGER: 0,
            zmq.MAXMSGSIZE: self._config.max_message_bytes,
            zmq.RCVHWM: hwm,
            zmq.SNDHWM: hwm,
            zmq.RECONNECT_IVL: int(self._config.reconnect_min_s * 1000),
            zmq.RECONNECT_IVL_MAX: int(self._config.reconnect_max_s * 1000),
            **KEEPALIVE,
        }
        for option, value in options.items():
            sock.setsockopt(option, value)
        auth.apply_peer_security(sock, key=self._config.key, curve=self._config.curve, plain=self.plain)
        self.monitor = sock.get_monitor_socket(self.EVENTS)  # before connect(), so no handshake goes unseen
        sock.connect(self.endpoint)
        self.sock = sock
        self.answered = self.connected = False
        self.generation += 1
        self.expires_at = now + self._config.heartbeat.expiry_s
        self.next_heartbeat = now + self._config.heartbeat.interval_s
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self.monitor, zmq.POLLIN)
        self.send([self._ready])
        self._connects += 1
        log = logger.info if self._connects == 1 else logger.debug  # reconnects were announced with their delay
        log("connecting to broker %s (%s)", self.endpoint, self.mechanism)
        return sock

    @property
    def mechanism(self) -> str:
        if self._config.curve is not None:
            return "CurveZMQ"
        return "the key at the handshake" if self.plain else "no handshake security"

    def close(self, *, linger_ms: int = 0) -> None:
        if self.monitor is not None:
            self._poller.unregister(self.monitor)
            if self.sock is not None:
                self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        if self.sock is not None:
            self._poller.unregister(self.sock)
            self.sock.close(linger=linger_ms)
            self.sock = None
            self.generation += 1
        self.connected = False
        self.expires_at = self.next_heartbeat = math.inf

    def drop(self, now: float) -> float:
        """Close, and schedule the next connect after a back-off; returns the delay."""
        self.close()
        delay = backoff_delay(self._failures, self._config.reconnect_min_s, self._config.reconnect_max_s)
        self._failures += 1
        self.reconnect_at = now + delay
        return delay

    def heard(self, now: float, *, healthy: bool = True) -> None:
        """The broker is alive; ``healthy`` (anything but DISCONNECT) also resets the back-off."""
        self.expires_at = now + self._config.heartbeat.expiry_s
        self.answered = True
        if healthy:
            self._failures = 0

    def take_events(self, now: float) -> None:
        """Act on the monitor's handshake events; raises Unauthorized when the broker refuses us."""
        while self.monitor is not None:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                logger.info("connected to broker %s (%s)", self.endpoint, self.mechanism)
            elif kind == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                logger.info("connection to broker %s lost; libzmq reconnects", self.endpoint)
            elif auth.key_refused(kind, value):
                raise Unauthorized(self._refusal())
            elif auth.mechanism_mismatch(kind, value):
                self._on_mismatch(now)

    def _refusal(self) -> str:
        if self._config.curve is not None:
            return (
                f"broker {self.endpoint} refused this worker's CurveZMQ certificate at the handshake: "
                "put its public key in the broker's allow directory (--curve-allow)"
            )
        return (
            f"broker {self.endpoint} refused this worker's key at the handshake: "
            "give the broker's key with --key-file or ZDEPTH_KEY"
        )

    def _on_mismatch(self, now: float) -> None:
        """The two ends asked for different security: adapt where the key allows it, else give up."""
        if self._config.curve is not None:
            raise Unauthorized(
                f"broker {self.endpoint} does not use CurveZMQ: start it with --curve-secret, "
                "or start this worker without --curve-secret and --curve-server-key"
            )
        if self._config.key is None:
            raise Unauthorized(
                f"broker {self.endpoint} asks for credentials at the handshake that this worker lacks: "
                "give its key with --key-file or ZDEPTH_KEY (or, for a CurveZMQ broker, --curve-secret and --curve-server-key)"
            )
        self.plain = not self.plain
        delay = self.drop(now)
        if self.plain:
            logger.warning("broker %s now asks for the key at the handshake; reconnecting with it in %.2f s", self.endpoint, delay)
        else:
            logger.warning(
                "broker %s takes no key at the handshake (it was started without one); reconnecting without in %.2f s. "
                "The key still travels in READY", self.endpoint, delay,
            )  # fmt: skip

    def send(self, frames: list[Any]) -> bool:
        """Send without ever blocking the loop; a message that cannot be queued is dropped."""
        if self.sock is None:
            return False
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            logger.warning("send queue to broker %s is full; dropped a message", self.endpoint)
            return False

    def heartbeat_if_due(self, now: float) -> None:
        if self.sock is not None and now >= self.next_heartbeat:
            self.send([protocol.command(protocol.HEARTBEAT)])
            self.next_heartbeat = now + self._config.heartbeat.interval_s

    def next_event(self, *, reconnecting: bool) -> float:
        if self.sock is not None:
            return min(self.next_heartbeat, self.expires_at)
        return self.reconnect_at if reconnecting and not self.refused else math.inf
