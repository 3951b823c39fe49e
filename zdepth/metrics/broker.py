"""The broker's metrics: answers and dispatches counted on the loop thread, the core's state read per scrape.

The core belongs to the broker's loop thread, so the collector asks the loop
for a snapshot and waits for it (one pass of the loop, 50 ms at most when
idle); a loop that does not answer within ``SNAPSHOT_WAIT_S`` shows as a
growing ``zdepth_broker_state_age_seconds``. A model no worker ever announced
is labelled ``other``; requests refused on arrival have op and model empty.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from zdepth import __version__
from zdepth.metrics.common import LATENCY_BUCKETS, OTHER, log, op_label, prometheus, status_label
from zdepth.protocol import STATUS_OK

if TYPE_CHECKING:  # only for annotations: importing them here would import the broker's core
    from zdepth.broker.core import BrokerCore
    from zdepth.broker.queues import HeldRequest

SNAPSHOT_WAIT_S = 1.0  # how long a scrape waits for the broker's loop before reporting its last state
WORKER_STATES = ("ready", "silent", "unhealthy", "draining")


class _Histogram:
    """One histogram series kept by the broker's loop thread alone: no lock on the request path."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket (not cumulative); the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # first bound >= seconds: "le" that bound
        self.sum += seconds

    def copy(self) -> tuple[list[int], float]:
        return list(self.counts), self.sum


class _Answers:
    """One (op, model, status) series: its count and, for successful model requests, the round trip."""

    __slots__ = ("count", "round_trip")

    def __init__(self, round_trip: _Histogram | None) -> None:
        self.count = 0
        self.round_trip = round_trip


class BrokerMetrics:
    """The broker's metrics: answers and dispatches counted as they happen, the core's state read per scrape.

    ``BrokerMetrics(core)`` hooks itself into ``core.stats``; the broker's loop
    calls ``dispatched`` for each request it sends to a worker and
    ``serve_snapshot`` once per pass (a no-op unless a scrape waits).

    Counts and histograms are plain numbers owned by the loop thread (a
    prometheus_client Counter or Histogram takes a lock per update, which cost
    about 4x as much per request); they are copied with the rest of the state
    for each scrape and exported by the same collector, so one scrape's numbers
    all come from one instant.
    """

    def __init__(self, core: BrokerCore, *, registry: Any = None) -> None:
        prometheus_client = prometheus()
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self._core = core
        prometheus_client.Info("zdepth_broker", "The broker's version.", registry=self.registry).info({"version": __version__})
        prometheus_client.ProcessCollector(registry=self.registry)
        self._answers: dict[tuple[str, str, str], _Answers] = {}  # by labels
        self._answers_by_value: dict[tuple[Any, Any, Any], _Answers] = {}  # by the values the core passes, when known
        self._round_trips: dict[tuple[str, str], _Histogram] = {}
        self._waits: dict[str, _Histogram] = {}  # by model label
        self._waits_by_value: dict[str, _Histogram] = {}
        # The scrape-time handshake with the loop thread: a scrape sets `wanted` and waits for `_fresh`.
        self.wanted = False
        self._fresh = threading.Event()
        self._scrape_lock = threading.Lock()
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_at = time.monotonic()  # of the snapshot (before the first: since start)
        self.registry.register(_BrokerStateCollector(self))
        core.stats.sink = self

    # Called on the broker's loop thread, per request.

    def _model(self, model: str | None) -> str:
        if model is None:
            return ""
        return model if model in self._core.workers.model_last_seen else OTHER

    def answered(self, op: str, model: str | None, status: str, latency_s: float | None) -> None:
        """One reply left for a client (``latency_s`` None: answered at once, not timed)."""
        series = self._answers_by_value.get((op, model, status))
        if series is None:
            series = self._answer_series(op, model, status)
        series.count += 1
        if series.round_trip is not None and latency_s is not None:
            series.round_trip.observe(latency_s)

    def _answer_series(self, op: str, model: str | None, status: str) -> _Answers:
        labels = (op_label(op), self._model(model), status_label(status))
        series = self._answers.get(labels)
        if series is None:
            round_trip = None
            if status == STATUS_OK and model is not None:
                round_trip = self._round_trips.setdefault(labels[:2], _Histogram())
            series = self._answers[labels] = _Answers(round_trip)
        # Remembered by the raw values only when those are known ones, so this stays as small as the
        # series; an unannounced model may be announced later, and is looked up again then.
        if labels[1] != OTHER and labels[2] != OTHER:
            self._answers_by_value[(op, model, status)] = series
        return series

    def dispatched(self, request: HeldRequest | None) -> None:
        """The loop sent ``request`` to a worker (None: already settled meanwhile, nothing to count)."""
        if request is None:
            return
        wait = self._waits_by_value.get(request.model)
        if wait is None:
            label = self._model(request.model)
            wait = self._waits.setdefault(label, _Histogram())
            if label != OTHER:
                self._waits_by_value[request.model] = wait
        wait.observe(request.dispatched - request.received)

    def _counts(self) -> dict[str, Any]:
        return {
            "answers": [(labels, series.count) for labels, series in self._answers.items()],
            "round_trips": [(labels, hist.copy()) for labels, hist in self._round_trips.items()],
            "waits": [((label,), hist.copy()) for label, hist in self._waits.items()],
        }

    def serve_snapshot(self, now: float) -> None:
        """On the loop thread: if a scrape waits, read the core's state for it."""
        if self.wanted:
            self.wanted = False
            try:
                self._snapshot = {**_read_state(self._core, now, self._model), **self._counts()}
                self._snapshot_at = time.monotonic()
            except Exception:  # metrics must never take the broker down; the scrape gets the last state
                log.exception("reading the broker's state for metrics failed")
            finally:
                self._fresh.set()

    # Called on the exporter's thread.

    def snapshot(self) -> tuple[dict[str, Any] | None, float]:
        """The core's state, fresh from the loop if it answers within SNAPSHOT_WAIT_S, and its age in seconds."""
        with self._scrape_lock:
            self._fresh.clear()
            self.wanted = True
            self._fresh.wait(SNAPSHOT_WAIT_S)
            return self._snapshot, time.monotonic() - self._snapshot_at


def _read_state(core: BrokerCore, now: float, label: Callable[[str], str]) -> dict[str, Any]:
    """Everything the state collector reports, read at one instant on the loop thread; ``label`` names a model."""
    health = core.health(now)
    models = set(core.workers.model_last_seen)
    queued: dict[str, list[int]] = {}
    for model, queue in core.held.queues.items():
        if queue:
            counts = queued.setdefault(label(model), [0, 0])
            counts[0] += len(queue)
            counts[1] += sum(r.size for r in queue)
    in_flight: dict[str, int] = {}
    for request in core.held.dispatched.values():
        model = label(request.model)
        in_flight[model] = in_flight.get(model, 0) + 1
    by_model: dict[str, dict[str, int]] = {m: dict.fromkeys(WORKER_STATES, 0) for m in models}
    workers = []
    for worker in health["workers"]:
        for model in worker["models"]:
            by_model.setdefault(model, dict.fromkeys(WORKER_STATES, 0))[worker["state"]] += 1
        workers.append(worker)
    return {
        "stopping": core.stopping,
        "queued": {m: queued.get(m, [0, 0]) for m in models | set(queued)},
        "in_flight": {m: in_flight.get(m, 0) for m in models | set(in_flight)},
        "held_bytes": core.held.total_bytes,
        "queue_limit": core.config.max_queue,
        "queue_limit_bytes": core.config.max_queue_bytes,
        "workers": workers,
        "by_model": by_model,
        "dropped_replies": core.stats.dropped_replies,
    }


class _BrokerStateCollector:
    """Gauges of the core's state, produced per scrape from a snapshot the loop thread takes."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []  # produced per scrape; nothing to check against other collectors at registration

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state, age = self._metrics.snapshot()
        yield GaugeMetricFamily("zdepth_broker_state_age_seconds", "How old the broker state below is; it grows while the broker's loop does not answer.", value=age)
        if state is None:
            return
        requests = CounterMetricFamily(
            "zdepth_broker_requests",
            "Requests answered by the broker, by op, model and status (ok or the error code); "
            "op and model are empty for requests refused on arrival.",
            labels=["op", "model", "status"],
        )
        for labels, count in state["answers"]:
            requests.add_metric(list(labels), count)
        yield requests
        yield _histogram(
            "zdepth_broker_round_trip_seconds", "From a request's arrival at the broker to its successful reply leaving it.", ["op", "model"], state["round_trips"]
        )
        yield _histogram(
            "zdepth_broker_queue_wait_seconds",
            "From a request's arrival at the broker to its dispatch to a worker (to each dispatch, if a lost worker's request is re-queued).",
            ["model"],
            state["waits"],
        )
        yield GaugeMetricFamily("zdepth_broker_stopping", "1 while the broker drains for shutdown.", value=int(state["stopping"]))
        queued = GaugeMetricFamily("zdepth_broker_queued_requests", "Requests waiting for a worker, by model.", labels=["model"])
        queued_bytes = GaugeMetricFamily("zdepth_broker_queued_bytes", "Body bytes of the requests waiting for a worker, by model.", labels=["model"])
        for model, (count, size) in sorted(state["queued"].items()):
            queued.add_metric([model], count)
            queued_bytes.add_metric([model], size)
        yield queued
        yield queued_bytes
        in_flight = GaugeMetricFamily("zdepth_broker_in_flight_requests", "Requests at workers, by model.", labels=["model"])
        for model, count in sorted(state["in_flight"].items()):
            in_flight.add_metric([model], count)
        yield in_flight
        yield GaugeMetricFamily("zdepth_broker_held_bytes", "Body bytes of every request the broker holds, waiting or at workers (limit: zdepth_broker_queue_limit_bytes).", value=state["held_bytes"])
        yield GaugeMetricFamily("zdepth_broker_queue_limit_requests", "Requests the broker holds at most, waiting or at workers; past it: overloaded.", value=state["queue_limit"])
        yield GaugeMetricFamily("zdepth_broker_queue_limit_bytes", "Body bytes the broker holds at most; past it: overloaded.", value=state["queue_limit_bytes"])
        states = GaugeMetricFamily("zdepth_broker_workers", "Connected workers by state (ready, silent, unhealthy, draining).", labels=["state"])
        totals = dict.fromkeys(WORKER_STATES, 0)
        for worker in state["workers"]:
            totals[worker["state"]] = totals.get(worker["state"], 0) + 1
        for name, count in totals.items():
            states.add_metric([name], count)
        yield states
        by_model = GaugeMetricFamily(
            "zdepth_broker_model_workers",
            "Workers serving each model ever announced, by state; ready 0 means requests for the model wait or fail.",
            labels=["model", "state"],
        )
        for model, counts in sorted(state["by_model"].items()):
            for name, count in counts.items():
                by_model.add_metric([model, name], count)
        yield by_model
        capacity = GaugeMetricFamily("zdepth_broker_worker_capacity", "Requests each worker may hold at once.", labels=["worker"])
        held = GaugeMetricFamily("zdepth_broker_worker_in_flight", "Requests each worker holds now.", labels=["worker"])
        service = GaugeMetricFamily("zdepth_broker_worker_service_seconds", "Each worker's smoothed time from dispatch to reply.", labels=["worker"])
        for worker in state["workers"]:
            name = str(worker.get("name"))
            capacity.add_metric([name], worker["capacity"])
            held.add_metric([name], worker["in_flight"])
            if worker["service_ms"] is not None:
                service.add_metric([name], worker["service_ms"] / 1000)
        yield capacity
        yield held
        yield service
        yield CounterMetricFamily("zdepth_broker_dropped_replies", "Replies dropped for clients that were gone or not reading.", value=state["dropped_replies"])


def _histogram(name: str, documentation: str, labels: list[str], series: list[tuple[tuple[str, ...], tuple[list[int], float]]]) -> Any:
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    family = HistogramMetricFamily(name, documentation, labels=labels)
    bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    for values, (counts, total) in series:
        cumulative, buckets = 0, []
        for bound, count in zip(bounds, counts):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric(list(values), buckets, total)
    return family
