"""Waits between retries that double and are jittered, so that many peers that failed together
(workers after a broker restart, children of one ``serve``) do not retry in lock step."""

from __future__ import annotations

import random


def backoff_delay(failures: int, low: float, high: float, *, rand: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``failures + 1``: doubling from ``low``, at most ``high``,
    a uniform draw from the upper half of that ceiling (never below ``low``)."""
    ceiling = min(high, low * 2 ** min(failures, 60))
    return (rand or random).uniform(max(low, ceiling / 2), ceiling)
