"""The asyncio client: ``async with AsyncClient("tcp://gpu-box:5555") as c: await c.metric_depth(frame)``.

The same API as ``zdepth.client.Client``, as coroutines, with the same
timeouts, retries and errors (building calls, the pipeline and decoding
replies are shared: ``zdepth.client.base``), several brokers and failover
included. One socket per broker carries every call: any number of tasks may
await calls on one AsyncClient at once, and a background task per socket
matches replies to them by attempt id. Use it from one event loop. Imports no torch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Sequence

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from zdepth.client.base import READY_POLL_S, ClientBase
from zdepth.client.calls import Call
from zdepth.client.exchanges import Exchange
from zdepth.client.links import REOPEN
from zdepth.client.options import ClientState
from zdepth.client.replies import brokers_health
from zdepth.client.results import DepthResult, PointCloudResult
from zdepth.client.sockets import close_socket, open_dealer
from zdepth.client.streams import END, LatestSlot, StreamState, aiter_frames, read_latest
from zdepth.client.sync import Client, StreamItem
from zdepth.client.urls import fetch_image, is_url
from zdepth.errors import DeadlineExceeded
from zdepth.pointcloud import Intrinsics
from zdepth.protocol import OP_RELATIVE

log = logging.getLogger(__name__)

__all__ = ["AsyncClient"]

IDLE_WAIT_S = 1.0


class AsyncClient(ClientBase):
    """An asyncio zdepth client: arguments (addresses, lists of brokers and profile names included), defaults,
    timeouts, retries, errors, the time bound and failover between brokers as ``zdepth.Client``. Images given
    by URL are downloaded in a worker thread, so the event loop keeps running.

    Use ``async with``, or ``await client.aclose()``.
    """

    # Options and their checks live in ClientBase.__init__; the sockets are made on first use, one per broker
    # (in the order of ``addresses``), each with a task reading its replies and one reading its monitor.
    _sockets: list[zmq.asyncio.Socket | None] | None = None
    _monitors: list[zmq.asyncio.Socket | None] | None = None
    _receivers: list[asyncio.Task | None] | None = None
    _watchers: list[asyncio.Task | None] | None = None
    _timer: asyncio.TimerHandle | None = None  # wakes the loop at the pipeline's next deadline (see _arm)
    _timer_at = math.inf

    @classmethod
    def from_profile(cls, name: str, **overrides: Any) -> AsyncClient:
        """A client for a saved server profile (address, key, model, timeout, CurveZMQ certificates); ``overrides`` win."""
        return cls(**cls._profile_kwargs(name, overrides))

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> AsyncClient:
        """Connect now (otherwise the first call connects); needs a running event loop."""
        self._open()
        return self

    def _open(self) -> None:
        self._check_usable()
        if self._sockets is None:
            count = len(self.addresses)
            self._sockets, self._monitors = [None] * count, [None] * count
            self._receivers, self._watchers = [None] * count, [None] * count
            try:
                for index in range(count):
                    self._open_socket(index)
            except BaseException:
                self._drop_sockets()
                raise
            self._state = ClientState.OPENED

    def _ensure_open(self) -> None:
        self._open()

    def _open_socket(self, index: int) -> None:
        """A DEALER to broker ``index`` with the client's options and security, a task reading its replies and
        one its monitor."""
        assert self._sockets is not None and self._monitors is not None
        assert self._receivers is not None and self._watchers is not None
        loop = asyncio.get_running_loop()
        link = self._pipeline.links[index]
        sock, monitor = open_dealer(zmq.asyncio.Context.instance(), link, key=self._pipeline.key, curve=self.curve)
        self._sockets[index], self._monitors[index] = sock, monitor
        link.reset(time.monotonic())
        self._receivers[index] = loop.create_task(self._receive(sock))
        self._watchers[index] = loop.create_task(self._watch(monitor))

    async def aclose(self) -> None:
        """Drop the sockets and anything unsent; calls still waiting fail. Idempotent."""
        self.close()

    def close(self) -> None:
        self._drop_sockets()
        self._state = ClientState.CLOSED
        for exchange in self._pipeline.pending():
            exchange.done = True
            exchange.error = RuntimeError(f"the client for {self.address} was closed while this request was out")
            _wake(exchange)

    async def __aenter__(self) -> AsyncClient:
        return await self.open()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ calls (see Client for the details)

    async def relative_depth(self, image: Any, *, encoder: str | None = None, input_size: int | None = None) -> DepthResult:
        started = time.monotonic()
        image = await self._fetched(image)
        return await self._call(self._build_relative(image, encoder=encoder, input_size=input_size, created=started))

    async def metric_depth(
        self,
        image: Any,
        *,
        encoder: str | None = None,
        dataset: str | None = None,
        max_depth: float | None = None,
        input_size: int | None = None,
    ) -> DepthResult:
        started = time.monotonic()
        image = await self._fetched(image)
        return await self._call(
            self._build_metric(
                image, encoder=encoder, dataset=dataset, max_depth=max_depth, input_size=input_size, created=started
            )
        )

    async def legacy_relative_depth(
        self,
        image: Any,
        *,
        encoder: str | None = None,
        dataset: str | None = None,
        input_size: int | None = None,
    ) -> DepthResult:
        started = time.monotonic()
        image = await self._fetched(image)
        return await self._call(
            self._build_metric(image, encoder=encoder, dataset=dataset, max_depth=1.0, input_size=input_size, created=started)
        )

    async def pointcloud(
        self,
        image: Any,
        intrinsics: Intrinsics | Any,
        *,
        encoder: str | None = None,
        dataset: str | None = None,
        max_depth: float | None = None,
        input_size: int | None = None,
        colors: bool = True,
        on_server: bool = False,
    ) -> PointCloudResult:
        started = time.monotonic()
        image = await self._fetched(image)
        return await self._call(
            self._build_pointcloud(
                image,
                intrinsics,
                colors=colors,
                on_server=on_server,
                encoder=encoder,
                dataset=dataset,
                max_depth=max_depth,
                input_size=input_size,
                created=started,
            )
        )

    async def health(self) -> dict[str, Any]:
        return await self._call(self._build_health())

    async def health_all(self) -> dict[str, Any]:
        self._begin()
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        exchanges = [self._pipeline.open(self._build_health(), now, pin=index) for index in range(len(self.addresses))]
        for exchange in exchanges:
            exchange.waiter = loop.create_future()
        try:
            self._flush()
            while not all(exchange.done for exchange in exchanges):
                waiting = [exchange.waiter for exchange in exchanges if not exchange.done]
                await self._wait(waiting, self._pipeline.next_deadline())
            return brokers_health(exchanges, self.addresses)
        finally:
            for exchange in exchanges:
                self._pipeline.forget(exchange)

    async def wait_ready(self, timeout: float | None = None, *, model: str | None = None, workers: int = 1) -> dict[str, Any]:
        until = self._ready_bound(timeout, workers)
        started = time.monotonic()
        answered: dict[str, Any] | None = None
        failed: DeadlineExceeded | None = None
        while True:
            try:
                answered = await self._call(self._build_health(), until=until)
            except DeadlineExceeded as exc:
                failed = exc
            else:
                if self._ready(answered, model, workers):
                    return answered
            left = until - time.monotonic()
            if left <= 0:
                raise self._not_ready(answered if answered is not None else failed, time.monotonic() - started, model, workers)
            await asyncio.sleep(min(READY_POLL_S, left))

    def stream(
        self,
        frames: Iterable[Any] | AsyncIterable[Any],
        *,
        op: str = OP_RELATIVE,
        max_in_flight: int = 4,
        latest_only: bool = False,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> AsyncIterator[StreamItem]:
        """``Client.stream`` as an async generator: ``async for result in client.stream(frames): ...``.

        ``frames`` may be an async iterable, or a plain one (a list or tuple is
        read in the loop; any other iterable, such as a camera generator, is
        read in a worker thread so a blocking read never stalls the loop). With
        ``latest_only=True`` a task reads the frames as fast as they come. Close
        the generator when leaving early (``contextlib.aclosing``) so the
        reader stops at once.
        """
        build = self._stream_builder(op, max_in_flight, kwargs)
        state = StreamState(self._pipeline, build, max_in_flight, return_exceptions)
        return self._stream(aiter_frames(frames), state, latest_only)

    # ------------------------------------------------------------------ driving the socket

    async def _call(self, call: Call, *, until: float = math.inf) -> Any:
        """Open the call in the pipeline, send it, and wait for its outcome (``until``: an earlier bound)."""
        self._begin()
        exchange = self._pipeline.open(call, time.monotonic(), until=until)
        exchange.waiter = asyncio.get_running_loop().create_future()
        try:
            self._flush()
            while not exchange.done:
                await self._wait([exchange.waiter], self._pipeline.next_deadline())
            return exchange.result()
        finally:
            self._pipeline.forget(exchange)

    async def _fetched(self, image: Any) -> Any:
        """An image given by URL, downloaded in a worker thread so the event loop keeps running; else as given."""
        if is_url(image):
            return await asyncio.to_thread(fetch_image, image, timeout=self.timeout)
        return image

    def _submit(self, state: StreamState, index: int, frame: Any) -> None:
        self._begin()
        exchange = state.submit(index, frame, time.monotonic())
        exchange.waiter = asyncio.get_running_loop().create_future()
        self._flush()

    def _put(self, target: int, frames: list[Any]) -> bool:
        """The shared ``_flush``'s socket send: broker ``target``'s socket, never blocking."""
        assert self._sockets is not None
        sock = self._sockets[target]
        if sock is None:
            return False
        # With NOBLOCK the future is already settled: sending never awaits.
        sent = sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        if sent.exception() is not None:
            if not isinstance(sent.exception(), zmq.Again):
                raise sent.exception()  # type: ignore[misc]
            return False
        return True

    async def _wait(self, waitables: Sequence[asyncio.Future], until: float) -> None:
        """Wait for any of ``waitables`` until ``until``; then settle expired deadlines and send what waits."""
        timeout = max(0.0, min(until - time.monotonic(), IDLE_WAIT_S))
        if waitables:
            await asyncio.wait(waitables, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(timeout)
        self._tick()

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        """Read the replies as they come on a broker's socket, until it is replaced or closed. It awaits only that
        there are some and reads them in ``_read_replies``, which ``_expire`` calls too: a reply that came in is
        never held in a future, unread, while a deadline is judged."""
        try:
            while True:
                await sock.poll(None, zmq.POLLIN)
                self._read_replies()
        except asyncio.CancelledError:
            raise
        except zmq.ZMQError as exc:  # the socket was closed under us
            log.debug("receiver for %s stopped: %s", self.address, exc)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Read the socket's connection events as they come; then send what they allow."""
        try:
            while self._monitors is not None and monitor in self._monitors:
                await monitor.poll(None, zmq.POLLIN)
                if self._monitors is not None and monitor in self._monitors:
                    self._flush()  # reads the events first
                    self._arm()  # a send it found blocked is tried again soon, though no call waits for that
        except asyncio.CancelledError:
            raise
        except zmq.ZMQError as exc:  # the socket was closed under us
            log.debug("monitor for %s stopped: %s", self.address, exc)

    def _read_replies(self) -> None:
        """Feed every waiting reply of every socket to the pipeline; wake what they settle."""
        for index, sock in enumerate(self._sockets or ()):
            while sock is not None:
                received = sock.recv_multipart(zmq.NOBLOCK, copy=False)  # settled at once: never awaits
                error = received.exception()
                if isinstance(error, zmq.Again):
                    break
                if error is not None:
                    raise error
                exchange = self._pipeline.receive(received.result(), time.monotonic(), index)
                if exchange is not None:
                    _wake(exchange)

    def _read_monitors(self) -> None:
        """Feed every waiting connection event of every socket to the pipeline; wake what they settle; reopen a
        socket when asked."""
        if self._monitors is None:
            return
        for index in range(len(self._monitors)):
            monitor = self._monitors[index]
            while monitor is not None and self._monitors is not None and self._monitors[index] is monitor:
                received = monitor.recv_multipart(zmq.NOBLOCK)  # settled at once: never awaits
                error = received.exception()
                if isinstance(error, zmq.Again):
                    break
                if error is not None:
                    raise error
                message = parse_monitor_message(received.result())
                action, failed = self._pipeline.link_event(index, message["event"], message["value"], time.monotonic())
                for exchange in failed:
                    _wake(exchange)
                if action == REOPEN:
                    self._reopen(index)

    def _tick(self) -> None:
        """Settle replies, events and expired deadlines, in that order (``_expire``), wake their callers, and
        send what waits."""
        for exchange in self._expire():
            _wake(exchange)
        if self._sockets is not None and not self.closed:
            self._send_waiting()
            self._arm()

    def _arm(self) -> None:
        """Have the loop tick at the pipeline's next deadline, whoever waits.

        A call waits until the next deadline it saw before it began waiting;
        a flush made meanwhile by another task (the monitor task, when a
        connection comes up) can set an earlier one: a send that would block
        on a connection just up, to try again in ``SEND_RETRY_S``, or a
        first-choice grace period. Without this timer such a send waited for
        the call's own deadline, which expired the attempt unsent.
        """
        when = self._pipeline.next_deadline()
        if when >= self._timer_at:
            return  # an earlier (or the same) tick is due anyway, and it arms the next
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_later(max(0.0, when - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._tick()

    def _close_socket_at(self, index: int) -> None:
        self._drop_socket(index)

    def _drop_socket(self, index: int) -> None:
        """Close broker ``index``'s socket and monitor (linger 0): unsent requests and late replies to it are gone."""
        assert self._sockets is not None and self._monitors is not None
        assert self._receivers is not None and self._watchers is not None
        for task in (self._receivers[index], self._watchers[index]):
            if task is not None:
                try:
                    task.cancel()
                except RuntimeError:  # its event loop has already closed
                    pass
        self._receivers[index] = self._watchers[index] = None
        sock, monitor = self._sockets[index], self._monitors[index]
        self._sockets[index] = self._monitors[index] = None
        if sock is not None:
            close_socket(sock, monitor)

    def _drop_sockets(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        if self._sockets is not None:
            for index in range(len(self._sockets)):
                self._drop_socket(index)
        self._sockets = self._monitors = self._receivers = self._watchers = None

    # ------------------------------------------------------------------ streams

    async def _stream(self, frames: AsyncIterator[Any], state: StreamState, latest_only: bool) -> AsyncIterator[StreamItem]:
        self._open()
        slot = reader = arrived = None
        if latest_only:
            slot, arrived = LatestSlot(), asyncio.Event()
            reader = asyncio.get_running_loop().create_task(read_latest(frames, slot, arrived))
        index = 0
        exhausted = False
        try:
            while True:
                for item in state.ready():
                    yield item
                if slot is not None:
                    if slot.error is not None:
                        raise slot.error
                    arrived.clear()  # before take(): a frame put after it sets the event again
                    while state.room() and (item := slot.take()) is not None:
                        self._check_usable()
                        self._submit(state, item[0], await self._fetched(item[1]))
                    exhausted = slot.exhausted
                else:
                    while state.room() and not exhausted:
                        frame = await anext(frames, END)
                        if frame is END:
                            exhausted = True
                        else:
                            self._check_usable()
                            self._submit(state, index, await self._fetched(frame))
                            index += 1
                if exhausted and state.head is None:
                    return
                if state.head is not None and state.head.done:
                    continue
                waitables = [state.head.waiter] if state.head is not None else []
                frame_wait = None
                if slot is not None and state.room() and not exhausted:
                    frame_wait = asyncio.ensure_future(arrived.wait())
                    waitables.append(frame_wait)
                try:
                    await self._wait(waitables, self._pipeline.next_deadline())
                finally:
                    if frame_wait is not None:
                        frame_wait.cancel()
        finally:
            state.abandon()
            if reader is not None:
                reader.cancel()
            else:
                await frames.aclose()


# The calls mirror Client's, so they share its docstrings.
for _name in ("relative_depth", "metric_depth", "legacy_relative_depth", "pointcloud", "health", "health_all", "wait_ready"):
    getattr(AsyncClient, _name).__doc__ = getattr(Client, _name).__doc__
del _name


def _wake(exchange: Exchange) -> None:
    if exchange.waiter is not None and not exchange.waiter.done():
        exchange.waiter.set_result(None)
