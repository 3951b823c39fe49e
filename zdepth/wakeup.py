"""A self-pipe that wakes a ZeroMQ poll from another thread or a signal handler.

ZeroMQ's poller takes plain file descriptors beside its sockets, so a byte on a
socket pair ends a wait at once, on every platform, without a second ZeroMQ socket.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

import zmq


class Wakeup:
    """``set`` from anywhere; the polling thread ``register``s it and asks ``woken(events)`` after each poll.

    A poll reports a plain descriptor by its number, not by an object registered for it, so the
    descriptor is registered and checked here, never by the caller (no ``fileno``): a wake-up that is
    never cleared keeps every later poll returning at once, and the loop spins.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._fd = self._reader.fileno()  # kept: unregister works after close

    def register(self, poller: zmq.Poller) -> None:
        poller.register(self._fd, zmq.POLLIN)

    def unregister(self, poller: zmq.Poller) -> None:
        poller.unregister(self._fd)

    def woken(self, events: Mapping[object, int]) -> bool:
        """Whether a poll's ``dict(events)`` include this wake-up; clears it when they do."""
        if self._fd not in events:
            return False
        self._clear()
        return True

    def set(self) -> None:
        try:
            self._writer.send(b"\0")
        except OSError:  # full: a wake-up is already pending; closed: the loop is gone
            pass

    def _clear(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
