"""What the worker answered: one INFO line per interval instead of one per request."""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["Traffic"]


class Traffic:
    """What the worker answered since the last summary: one INFO line per interval instead of one per request.

    ``reply`` is called by the I/O loop for every reply sent, ``batch`` by
    whichever thread runs a forward pass; ``summary`` returns the line (None
    when there was no traffic) and starts a new interval.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._codes: dict[str, int] = {}
        self._latencies_ms: list[float] = []
        self._batches: list[int] = []

    def reply(self, status: str, latency_ms: float) -> None:
        with self._lock:
            self._codes[status] = self._codes.get(status, 0) + 1
            self._latencies_ms.append(latency_ms)

    def batch(self, size: int) -> None:
        with self._lock:
            self._batches.append(size)

    def summary(self, elapsed_s: float) -> str | None:
        with self._lock:
            codes, latencies, batches = self._codes, self._latencies_ms, self._batches
            self._codes, self._latencies_ms, self._batches = {}, [], []
        total = sum(codes.values())
        if not total and not batches:
            return None
        ok = codes.pop("ok", 0)
        errors = ", ".join(f"{count} {code}" for code, count in sorted(codes.items())) or "no errors"
        line = f"last {elapsed_s:.1f} s: {total} requests ({total / max(elapsed_s, 1e-9):.1f}/s), {ok} ok, {errors}"
        if latencies:
            p50, p99 = np.percentile(latencies, [50, 99])
            line += f"; worker latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        if batches:
            line += f"; {len(batches)} batches, mean size {sum(batches) / len(batches):.2f}"
        return line
