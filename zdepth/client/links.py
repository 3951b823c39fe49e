"""What the client knows of each broker's connection: a ``Link`` per broker, fed by its socket's monitor.

Sans-IO: the drivers read the monitor events and hand them over; a link
says whether its connection is up, why it failed (a refused key, CurveZMQ on
one side only, no connection at all) in words a user can act on, and when
the socket must be replaced. Choosing among the links is the pipeline's.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import zmq

from zdepth.errors import BrokerUnreachable, ServiceError, Unauthorized
from zdepth.protocol.curve import CurveClient

log = logging.getLogger(__name__)

REOPEN = "reopen"
FIRST_CHOICE_GRACE_S = 0.25  # how long a fresh client waits for an earlier broker in its list before using a later one
REFUSED_RETRY_S = 5.0  # with other brokers to use, a broker that refused the handshake is tried again this seldom
UNREACHABLE_AFTER_S = 5.0  # longest wait for a connection, when timeout is longer


class Link:
    """What the client knows of its connection to one broker, from the socket's monitor events and its replies.

    Sans-IO: the driver feeds every monitor event to ``event``; ``up`` says
    whether a connection has passed its handshake, ``down_since`` since when
    none has. ``plain`` is whether the next socket should offer the key at the
    handshake (ZeroMQ PLAIN): a broker without a key answers PLAIN with a
    mechanism mismatch, and the client then reconnects without it. A refused
    handshake, or a CurveZMQ setting only one side has, leaves a ``failure``
    (an exception) that fails what is pending, and makes the next call open a
    fresh socket (ZeroMQ does not reconnect after a refusal). ``silent``: a
    request to it expired while nothing at all was heard from it, so a client
    with other brokers sends elsewhere until it is heard again.
    """

    def __init__(self, address: str, *, key: str | None, curve: CurveClient | None, now: float) -> None:
        self.address = address
        self.curve = curve
        self.has_key = key is not None
        self.plain = key is not None and curve is None
        self.reset(now)

    def reset(self, now: float) -> None:
        """A fresh socket: nothing connected yet."""
        self.up = False
        self.down_since: float | None = now
        self.opened_at = now
        self.ever_up = False
        self.connects = 0
        self.connect_retries = 0
        self.handshake_failures = 0
        self.failure: tuple[type[ServiceError], str, dict[str, Any]] | None = None
        self.failed_at = math.inf
        self.heard_at = -math.inf  # the last reply of any kind
        self.silent = False

    @property
    def usable(self) -> bool:
        return self.up and not self.silent

    def heard(self, now: float) -> None:
        """A reply came in on this connection: the broker is alive."""
        self.heard_at = now
        self.silent = False

    def event(self, event: int, value: int, now: float) -> str | None:
        """Take one monitor event; returns REOPEN when the socket must be replaced (with ``plain`` now False)."""
        from zdepth.protocol import auth

        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.up, self.down_since, self.ever_up, self.failure, self.silent = True, None, True, None, False
        elif event == zmq.EVENT_DISCONNECTED:
            if self.up:
                self.up, self.down_since = False, now
        elif event == zmq.EVENT_CONNECTED:
            self.connects += 1
        elif event == zmq.EVENT_CONNECT_RETRIED:
            self.connect_retries += 1
        elif auth.key_refused(event, value):
            self.handshake_failures += 1
            self.failure, self.failed_at = self._refused(), now
        elif auth.mechanism_mismatch(event, value):
            self.handshake_failures += 1
            if self.plain:
                self.plain = False
                log.info(
                    "the broker at %s does not ask for the key at the handshake (an older or keyless broker); "
                    "reconnecting without it: the key still travels in each request", self.address,
                )
                return REOPEN
            self.failure, self.failed_at = self._mismatch(), now
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            self.handshake_failures += 1
        return None

    def _refused(self) -> tuple[type[ServiceError], str, dict[str, Any]]:
        details = {"address": self.address, "reason": "handshake_refused"}
        if self.curve is not None:
            return Unauthorized, (
                f"the broker at {self.address} refused this client's CurveZMQ certificate: put the public half of "
                f"{self.curve.secret_file} (NAME.key) in the broker's --curve-allow folder and restart the broker"
            ), details
        return Unauthorized, (
            f"the broker at {self.address} refused the key; check ZDEPTH_KEY / ZDEPTH_KEY_FILE (or key / key_file in "
            "the profile, or key=) against the broker's key"
        ), details

    def _mismatch(self) -> tuple[type[ServiceError], str, dict[str, Any]]:
        details = {"address": self.address, "reason": "security_mismatch"}
        curve_hint = (
            "pass curve=CurveClient(secret_file, server_public_file) (zdepth.protocol.curve; or the profile fields "
            "curve_secret and curve_server_key), with this client's secret certificate from `zdepth keygen` "
            "and the broker's public one"
        )
        if self.curve is not None:
            return Unauthorized, (
                f"this client uses CurveZMQ but the broker at {self.address} does not: start the broker with "
                "--curve-secret (and --curve-allow), or drop curve= (and the profile's curve_secret and curve_server_key)"
            ), details
        if self.has_key:
            return Unauthorized, f"the broker at {self.address} uses CurveZMQ and this client does not: {curve_hint}", details
        return Unauthorized, (
            f"the broker at {self.address} asks for a key or CurveZMQ at the handshake, and this client has neither: "
            f"set ZDEPTH_KEY or ZDEPTH_KEY_FILE (or key / key_file in the profile, or key=); if the broker runs CurveZMQ, {curve_hint}"
        ), details

    def what_failed(self, waited: float) -> str:
        """Why no working connection came up in ``waited`` seconds, in a few words."""
        if self.failure is not None:
            if self.failure[2].get("reason") == "security_mismatch":
                return "its handshake security is not this client's (CurveZMQ on one side only)"
            return f"it refused this client's {'CurveZMQ certificate' if self.curve is not None else 'key'}"
        if self.ever_up:
            return f"the connection dropped and was not re-established in {waited:.1f} s"
        if self.handshake_failures:
            return (
                f"{self.handshake_failures} connection(s) were made but the security handshake never completed in {waited:.1f} s"
                + ("; with CurveZMQ, check that curve_server_key is the broker's public certificate" if self.curve is not None else "")
            )
        if self.connects:
            return f"a connection was made but its handshake did not complete in {waited:.1f} s"
        return f"no connection in {waited:.1f} s" + (f" ({self.connect_retries} retries)" if self.connect_retries else "")

    def unreachable(self, waited: float) -> tuple[type[ServiceError], str, dict[str, Any]]:
        """The error for a request that found no working connection for ``waited`` seconds."""
        details = {"address": self.address, "waited_s": waited, "reason": "unreachable"}
        return BrokerUnreachable, (
            f"cannot reach the broker at {self.address}: {self.what_failed(waited)}; check that the broker runs there "
            f"(zdepth health --server {self.address}), the address and port, and any firewall between"
        ), details


