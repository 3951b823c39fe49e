"""The self-pipe wake-up: a set wakes one poll, and once seen it stops waking (or the loop spins)."""

from __future__ import annotations

import threading
import time

import zmq

from zdepth.wakeup import Wakeup


def test_a_wakeup_ends_a_wait_once_and_is_cleared_by_woken():
    poller, wakeup = zmq.Poller(), Wakeup()
    wakeup.register(poller)
    try:
        assert poller.poll(0) == []
        threading.Timer(0.05, wakeup.set).start()
        started = time.monotonic()
        events = dict(poller.poll(5000))
        assert time.monotonic() - started < 2.0
        assert wakeup.woken(events)
        assert poller.poll(0) == [], "a wake-up that was seen must not wake the next poll"
        assert not wakeup.woken(dict(poller.poll(0)))
        for _ in range(3):  # several sets before a poll are one wake-up
            wakeup.set()
        assert wakeup.woken(dict(poller.poll(1000)))
        assert poller.poll(0) == []
    finally:
        wakeup.close()
        wakeup.unregister(poller)  # after close too: the descriptor was kept
    wakeup.set()  # a set after close is harmless (a frame reader may outlive its loop)
