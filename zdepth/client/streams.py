"""``stream``'s own state: calls out in frame order (``StreamState``), the newest frame waiting for room
(``LatestSlot``, for ``latest_only``), and the readers that drain a caller's frame source into it: a thread
for ``Client`` (``FrameReader``), tasks for ``AsyncClient`` (``aiter_frames``, ``read_latest``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterable, AsyncIterator, Callable, Iterable, Iterator

from zdepth.client.calls import Call
from zdepth.client.exchanges import Exchange
from zdepth.wakeup import Wakeup

if TYPE_CHECKING:
    from zdepth.client.pipeline import Pipeline

log = logging.getLogger(__name__)

END = object()  # what an exhausted frame source gives instead of a frame


class StreamState:
    """In-order delivery for ``stream``: which calls are out, whether there is room, what is ready."""

    def __init__(self, pipeline: Pipeline, build: Callable[[Any], Call], max_in_flight: int, return_exceptions: bool) -> None:
        self.pipeline = pipeline
        self.build = build
        self.max_in_flight = max_in_flight
        self.return_exceptions = return_exceptions
        self.out: deque[Exchange] = deque()

    def room(self) -> bool:
        return len(self.out) < self.max_in_flight

    @property
    def head(self) -> Exchange | None:
        return self.out[0] if self.out else None

    def submit(self, index: int, frame: Any, now: float) -> Exchange:
        exchange = self.pipeline.open(self.build(frame), now, index=index)
        self.out.append(exchange)
        return exchange

    def ready(self) -> Iterator[Any]:
        """Settled results at the head, in order; a failure raises unless ``return_exceptions``."""
        while self.out and self.out[0].done:
            exchange = self.out.popleft()
            self.pipeline.forget(exchange)
            if exchange.error is not None and self.return_exceptions:
                yield exchange.error
            else:
                yield exchange.result()

    def abandon(self) -> None:
        """The consumer stopped: forget what is still out, so late replies are dropped."""
        for exchange in self.out:
            self.pipeline.forget(exchange)
        self.out.clear()


class LatestSlot:
    """The newest frame not yet sent. A newer frame replaces it, and the replaced one is dropped.

    Filled by a reader (a thread in client.py, a task in aio.py) that drains
    the caller's frame source as fast as it produces frames; taken by the
    stream loop whenever there is room in flight.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: tuple[int, Any] | None = None
        self.dropped = 0
        self.closed = False
        self.error: BaseException | None = None

    def put(self, index: int, frame: Any) -> None:
        with self._lock:
            if self._item is not None:
                self.dropped += 1
                log.debug("latest_only: dropping unsent frame %d for frame %d", self._item[0], index)
            self._item = (index, frame)

    def take(self) -> tuple[int, Any] | None:
        with self._lock:
            item, self._item = self._item, None
            return item

    def close(self, error: BaseException | None = None) -> None:
        with self._lock:
            self.closed = True
            self.error = error

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self.closed and self._item is None


class FrameReader(threading.Thread):
    """Reads a frame source into a LatestSlot as fast as it yields, and wakes the stream loop's poll."""

    def __init__(self, frames: Iterable[Any], slot: LatestSlot) -> None:
        super().__init__(name="zdepth-frame-reader", daemon=True)
        self._frames = frames
        self._slot = slot
        self._lock = threading.Lock()
        self._stopped = False
        self.wakeup = Wakeup()

    def run(self) -> None:
        try:
            for index, frame in enumerate(self._frames):
                if self._stopped:
                    return
                self._slot.put(index, frame)
                self._wake()
        except BaseException as exc:  # handed to the consumer, raised there
            self._slot.close(exc)
        else:
            self._slot.close()
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            if not self._stopped:
                self.wakeup.set()

    def stop(self) -> None:
        """Stop reading at the next frame; never waits for the source (a camera read may block)."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self.wakeup.close()


async def aiter_frames(frames: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    """Frames as an async iterator; a blocking iterable (not a list or tuple) is read in a worker thread."""
    if isinstance(frames, AsyncIterable):
        async for frame in frames:
            yield frame
    elif isinstance(frames, (list, tuple)):
        for frame in frames:
            yield frame
    else:
        iterator = iter(frames)
        while (frame := await asyncio.to_thread(next, iterator, END)) is not END:
            yield frame


async def read_latest(frames: AsyncIterator[Any], slot: LatestSlot, arrived: asyncio.Event) -> None:
    """Drain ``frames`` into the slot (latest wins), signalling each arrival."""
    index = 0
    try:
        async for frame in frames:
            slot.put(index, frame)
            index += 1
            arrived.set()
            await asyncio.sleep(0)  # let the stream take it between frames of a fast source
    except asyncio.CancelledError:
        slot.close()
        raise
    except BaseException as exc:
        slot.close(exc)
    else:
        slot.close()
    arrived.set()
