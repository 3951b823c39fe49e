"""Dynamic batching: gather requests that can share one forward pass, against a deadline;
and the padded batch sizes that CUDA graphs are captured for.

A pure function over a plain ``queue.Queue`` (no ZeroMQ, no torch), so it is
tested on its own. The worker's compute thread calls it in a loop::

    pending: list[Task] = []
    while True:
        batch = collect_batch(tasks, max_batch=8, max_wait_s=0.002, key=lambda t: t.batch_key, pending=pending)
        ...

Requests can share a batch only when their ``key`` is equal (for the worker:
model id and network input size). Items taken off the queue with another key
wait in ``pending`` for a later batch, in arrival order; the oldest waiting
item always seeds the next batch, so no key starves behind a busy one.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

__all__ = ["collect_batch", "padded_batch", "padded_batches"]

T = TypeVar("T")


def _same(_item: object) -> Hashable:
    return None


def collect_batch(
    source: queue.Queue[T],
    *,
    max_batch: int,
    max_wait_s: float,
    key: Callable[[T], Hashable] = _same,
    pending: list[T] | None = None,
    timeout_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[T]:
    """The next batch: 1 to ``max_batch`` items sharing one key, oldest first.

    Blocks for the first item (``pending[0]`` if any, else ``source``), for at
    most ``timeout_s`` (None: forever; on timeout it returns ``[]``). Then it
    takes more items of the first item's key, first from ``pending`` and then
    from ``source``, until the batch is full or ``max_wait_s`` has passed since
    the first item was taken. A partial batch never waits longer than that.

    ``pending`` is the caller's list, kept between calls: items of other keys
    are appended to it and taken items are removed from it. It is always
    ordered by arrival, and all of it arrived before anything still in
    ``source``.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if pending is None:
        pending = []
    if pending:
        first = pending.pop(0)
    else:
        try:
            first = source.get(timeout=timeout_s)
        except queue.Empty:
            return []
    deadline = clock() + max_wait_s
    batch_key = key(first)
    batch = [first]
    _take_pending(pending, batch, batch_key, key, max_batch)
    while len(batch) < max_batch:
        remaining = deadline - clock()
        try:
            item = source.get(timeout=remaining) if remaining > 0 else source.get_nowait()
        except queue.Empty:
            break
        if key(item) == batch_key:
            batch.append(item)
        else:
            pending.append(item)
    return batch


def _take_pending(pending: list[T], batch: list[T], batch_key: Hashable, key: Callable[[T], Hashable], max_batch: int) -> None:
    """Move ``pending`` items with ``batch_key`` into ``batch`` (in order) until it is full."""
    kept: list[T] = []
    for item in pending:
        if len(batch) < max_batch and key(item) == batch_key:
            batch.append(item)
        else:
            kept.append(item)
    pending[:] = kept


def padded_batch(size: int) -> int:
    """``size`` rounded up to a power of two: the batch a CUDA graph is captured for (zdepth.engine.cudagraphs)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return 1 << (size - 1).bit_length()


def padded_batches(max_batch: int) -> list[int]:
    """Every padded size a batch of 1 to ``max_batch`` items runs at: 1, 2, 4, ... up to ``padded_batch(max_batch)``."""
    return sorted({padded_batch(size) for size in range(1, max_batch + 1)})
