"""A self-pipe that wakes a ZeroMQ poll from another thread or a signal handler.

ZeroMQ's poller takes plain file descriptors beside its sockets, so a byte on a
socket pair ends a wait at once, on every platform, without a second ZeroMQ socket.
"""

from __future__ import annotations

import socket


class Wakeup:
    """Register it with a ``zmq.Poller`` (it has ``fileno``); ``set`` from anywhere, ``clear`` in the polling thread."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def set(self) -> None:
        try:
            self._writer.send(b"\0")
        except OSError:  # full: a wake-up is already pending; closed: the loop is gone
            pass

    def clear(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
