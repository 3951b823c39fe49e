"""The client's sockets: one DEALER per broker, its options, and the monitor socket that reports its connection.

The only module of the client package, with the drivers (``sync``, ``aio``),
that touches ZeroMQ sockets; what the monitor reports is judged in ``links``.
"""

from __future__ import annotations

from typing import Any

import zmq

from zdepth.protocol.auth import apply_peer_security

SOCKET_HWM = 1000  # messages queued each way before sends report "would block"
# Largest reply frame accepted; a bigger one drops the connection (the call then times out). Generous:
# servers refuse to send frames above their own limit (64 MiB by default), so only a misbehaving peer gets here.
MAX_REPLY_FRAME_BYTES = 256 * 1024 * 1024
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000  # back off up to 2 s against a broker that is down
HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 6000  # no traffic for this long after a ping: the connection is dead
MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def configure_socket(socket: zmq.Socket) -> None:
    """Options of every client DEALER (security comes from ``zdepth.protocol.auth.apply_peer_security``).

    LINGER 0: a closed socket drops its unsent requests at once. IMMEDIATE on:
    a request is handed to ZeroMQ only while a connection is up (otherwise the
    send reports "would block" and the request waits in the pipeline's outbox,
    where its deadline can still drop it), so requests never pile up in a pipe
    to a broker that is down, to be delivered, stale, when it returns; and a
    connection that drops takes with it only what was already on it, which the
    pipeline resends when the connection is back. ZMTP heartbeats make a broker
    that vanished without closing the connection (a host that froze or lost
    power) show up as a disconnection within seconds.
    """
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IMMEDIATE, 1)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_FRAME_BYTES)
    socket.setsockopt(zmq.SNDHWM, SOCKET_HWM)
    socket.setsockopt(zmq.RCVHWM, SOCKET_HWM)
    socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)


def open_dealer(context: zmq.Context, link: Any, *, key: str | None, curve: Any) -> tuple[zmq.Socket, zmq.Socket]:
    """A DEALER to ``link``'s broker with the client's options and security, and the monitor that watches it.

    ``context`` decides the kind: a ``zmq.asyncio.Context`` gives asyncio sockets.
    """
    sock = context.socket(zmq.DEALER)
    monitor = None
    try:
        configure_socket(sock)
        apply_peer_security(sock, key=key, curve=curve, plain=link.plain)
        monitor = sock.get_monitor_socket(MONITOR_EVENTS)
        sock.connect(link.address)
    except BaseException:
        close_socket(sock, monitor)
        raise
    return sock, monitor


def close_socket(sock: zmq.Socket, monitor: zmq.Socket | None) -> None:
    """Close a client socket and its monitor. The monitor goes first: its inproc address is derived from the
    socket's descriptor, which the next socket may get."""
    if monitor is not None:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(linger=0)
    sock.close(linger=0)
