"""SIGINT and SIGTERM for the long-running commands: the first asks to stop politely, the next insist."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interrupt() -> None:
    raise KeyboardInterrupt


def on_stop_signals(first: Callable[[], None], again: Callable[[], None] = interrupt, *, doing: str = "stopping") -> Callable[[], None]:
    """The first SIGINT/SIGTERM calls ``first``, every later one ``again``; returns a function restoring the old handlers.

    Signal handlers can only be installed from the main thread; elsewhere
    (tests running a server in a thread) this installs nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    received = 0

    def handle(signum: int, _frame: Any) -> None:
        nonlocal received
        received += 1
        if received == 1:
            logger.info("%s received: %s (send it again to stop at once)", signal.Signals(signum).name, doing)
            first()
        else:
            again()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
