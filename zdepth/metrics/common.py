"""What the broker's and the workers' metrics share: the client library, loaded on demand, and bounded labels.

Label values are bounded, so no peer can grow a process's memory with new
series: a status that is not one of the protocol's is ``other``, an op that is
not one is empty.
"""

from __future__ import annotations

import logging
from typing import Any

from zdepth.errors import ConfigError
from zdepth.protocol import ERROR_CODES, OPS, STATUS_OK

log = logging.getLogger("zdepth.metrics")

# Seconds; a request through the broker takes about a millisecond on loopback, a large model's batch
# tens of milliseconds, and a request that waits for a busy GPU up to its deadline (30 s by default).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # the worker pads batches to powers of two
OTHER = "other"

_STATUSES = frozenset((STATUS_OK, *ERROR_CODES))


def prometheus():
    """The client library, or a ConfigError that says how to install it."""
    try:
        import prometheus_client
    except ModuleNotFoundError as exc:
        if exc.name != "prometheus_client":
            raise
        raise ConfigError("metrics need prometheus_client, which is not installed: pip install 'zdepth[metrics]'") from None
    return prometheus_client


def status_label(status: Any) -> str:
    """``status`` if the protocol knows it, else ``other``."""
    return status if status in _STATUSES else OTHER


def op_label(op: Any) -> str:
    """``op`` if the protocol knows it, else empty."""
    return op if op in OPS else ""
