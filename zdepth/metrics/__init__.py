"""Prometheus metrics of the broker and the workers, served over HTTP on an optional port.

Off by default: nothing here is imported until ``--metrics-port`` (or
``metrics_port`` in the config) asks for it, so the broker and the client do
not need ``prometheus_client`` (the ``metrics`` extra) unless it is on.

Each side owns its own ``CollectorRegistry`` (never the process-global one),
so several brokers or workers in one process, as in tests, do not collide.

- ``BrokerMetrics``: counters and histograms updated as requests are answered
  and dispatched (the broker's ``Stats`` and its socket loop call it), plus a
  collector that reports the core's state (queues, bytes held, workers by
  state) as it is at scrape time. The core belongs to the broker's loop
  thread, so the collector asks the loop for a snapshot and waits for it
  (one pass of the loop, 50 ms at most when idle); a loop that does not answer within
  ``SNAPSHOT_WAIT_S`` shows as a growing ``zdepth_broker_state_age_seconds``.
- ``WorkerMetrics``: methods the worker calls from any of its threads
  (``request_done``, ``inference``, ``decoded``) and callbacks read at scrape
  time (``read_held``, ``read_device_memory``; ``cuda_memory`` makes the
  latter for a CUDA device).
- ``serve(port, registry, host)``: the HTTP exporter; close what it returns.

One module each: ``broker``, ``worker``, ``server`` (the exporter) and
``common`` (the client library loader, buckets and bounded labels).

Label values are bounded, so no peer can grow the broker's memory with new
series: a status that is not one of the protocol's is ``other``, a model that
no worker ever announced is ``other``, and requests the broker refuses on
arrival have both op and model empty.
"""

from __future__ import annotations

from zdepth.metrics.broker import BrokerMetrics
from zdepth.metrics.server import DEFAULT_HOST, MetricsBindError, MetricsServer, serve
from zdepth.metrics.worker import WorkerMetrics, cuda_memory

__all__ = ["BrokerMetrics", "MetricsBindError", "MetricsServer", "WorkerMetrics", "cuda_memory", "serve", "DEFAULT_HOST"]
