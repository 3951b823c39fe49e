"""What the broker tells an operator at INFO: one summary line per period, not a line per request.

At 30 frames/s a line per request floods a terminal; those lines go to DEBUG,
and this keeps the counts behind the periodic summary: requests and errors by
code, latency percentiles, and requests per worker.

Every answer passes through here once, so this is also where the optional
metrics sink (``zdepth.metrics.BrokerMetrics``, set by the broker's loop when
metrics are on) hears of it.
"""

from __future__ import annotations

import collections
from typing import Protocol

from zdepth.protocol import STATUS_OK

MAX_SAMPLES = 4096  # latencies kept per period for the percentiles; later ones replace at random positions


class Sink(Protocol):
    def answered(self, op: str, model: str | None, status: str, latency_s: float | None) -> None: ...


class Stats:
    def __init__(self, sink: Sink | None = None) -> None:
        self.total: collections.Counter[str] = collections.Counter()  # by status, since start
        self.dropped_replies = 0
        self.sink = sink  # told of every answer too (None: metrics off)
        self._reset()

    def _reset(self) -> None:
        self.period: collections.Counter[str] = collections.Counter()
        self.per_worker: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        self._seen = 0

    def count(self, op: str, status: str) -> None:
        """An answer that was not timed (the broker's own health reply)."""
        self.total[status] += 1
        self.period[status] += 1
        if self.sink is not None:
            self.sink.answered(op, None, status, None)

    def answered(self, op: str, model: str | None, status: str, latency_s: float, worker: str | None) -> None:
        self.total[status] += 1
        self.period[status] += 1
        if self.sink is not None:
            self.sink.answered(op, model, status, latency_s)
        if worker is not None:
            self.per_worker[worker] += 1
        if status == STATUS_OK:
            self._seen += 1
            if len(self.latencies) < MAX_SAMPLES:
                self.latencies.append(latency_s)
            else:  # reservoir sampling keeps the percentiles honest for a busy period
                slot = hash((self._seen, latency_s)) % self._seen
                if slot < MAX_SAMPLES:
                    self.latencies[slot] = latency_s

    def summary(self, period_s: float) -> str | None:
        """One line for the period just ended (None if nothing happened); starts a new period."""
        if not self.period:
            return None
        requests = sum(self.period.values())
        parts = [f"{requests} requests in {period_s:.0f} s", f"ok {self.period[STATUS_OK]}"]
        errors = {k: v for k, v in sorted(self.period.items()) if k != STATUS_OK}
        if errors:
            parts.append("errors " + ", ".join(f"{k} {v}" for k, v in errors.items()))
        if self.latencies:
            ordered = sorted(self.latencies)
            p50 = ordered[len(ordered) // 2]
            p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
            parts.append(f"latency p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms")
        if self.per_worker:
            parts.append("per worker " + ", ".join(f"{k} {v}" for k, v in sorted(self.per_worker.items())))
        if self.dropped_replies:
            parts.append(f"{self.dropped_replies} replies dropped for clients not reading (since start)")
        self._reset()
        return "; ".join(parts)
