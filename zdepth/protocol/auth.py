"""Who may connect: the shared key proven at the ZeroMQ handshake, before any message is read.

A key carried only in each request's header is checked after libzmq has
received the whole message, and libzmq's size limit is per frame: a peer
without the key could still make the broker buffer a message of many large
frames. So a broker with a key makes every connection prove it first, with
ZeroMQ's PLAIN mechanism (username ``zdepth``, password the key) checked by a
ZAP handler in constant time; a peer without the key never gets a message in.
With CurveZMQ the allow-list does this job (and encrypts); a broker without a
key accepts anyone, as before. The key in each header is still checked: the
protocol does not depend on the transport's security.

PLAIN sends the key in clear at the handshake, as the header always did:
only CurveZMQ hides it from someone watching the LAN.
"""

from __future__ import annotations

import hmac
import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator

from zdepth.protocol.curve import CurveClient, CurveServer, apply_client, apply_server, start_authenticator

log = logging.getLogger(__name__)

PLAIN_USERNAME = "zdepth"


class _KeyAuthenticator(ThreadAuthenticator):
    """Accepts a PLAIN handshake whose password is the key, compared in constant time."""

    def __init__(self, context: zmq.Context, key: str) -> None:
        super().__init__(context, log=logging.getLogger(f"{__name__}.zap"))
        self._key = key.encode()

    def _authenticate_plain(self, domain: str, username: str, password: str) -> tuple[bool, bytes]:
        if hmac.compare_digest(password.encode(), self._key):
            return True, b"OK"
        log.warning("refused a connection whose handshake carried a wrong key (set ZDEPTH_KEY or --key-file to the broker's key)")
        return False, b"wrong key"


def start_broker_auth(context: zmq.Context, *, key: str | None, curve: CurveServer | None) -> ThreadAuthenticator | None:
    """Start the ZAP handler the broker's sockets need, or None when anyone may connect."""
    if curve is not None:
        return start_authenticator(context, curve)
    if key is None:
        return None
    auth = _KeyAuthenticator(context, key)
    auth.start()
    return auth


def apply_broker_security(sock: zmq.Socket, *, key: str | None, curve: CurveServer | None) -> None:
    """Make a broker ROUTER ask for CurveZMQ, or for the key at the handshake."""
    if curve is not None:
        apply_server(sock, curve)
    elif key is not None:
        sock.plain_server = True


def apply_peer_security(sock: zmq.Socket, *, key: str | None, curve: CurveClient | None, plain: bool = True) -> None:
    """Make a client or worker DEALER prove itself: CurveZMQ, else the key over PLAIN, else nothing.

    ``plain=False`` is for a broker that turned out to have no key (its handshake
    reported a mechanism mismatch): the key then travels in headers only.
    """
    if curve is not None:
        apply_client(sock, curve)
    elif key is not None and plain:
        sock.plain_username = PLAIN_USERNAME.encode()
        sock.plain_password = key.encode()


def mechanism_mismatch(event: int, value: int) -> bool:
    """True for a monitor event saying the two ends asked for different security mechanisms."""
    return event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH


def key_refused(event: int, value: int) -> bool:
    """True for a monitor event saying the broker refused this peer's credentials (key or certificate)."""
    return event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
