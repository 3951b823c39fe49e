"""The blocking client: ``with Client("tcp://gpu-box:5555") as c: c.metric_depth(frame)``.

One DEALER socket per broker address, hidden from the caller; requests go to
one broker at a time and move to the next when it fails. Each attempt waits at
most ``timeout`` seconds for its reply; an attempt that gets none is retried,
up to ``retries`` times, and then the call raises DeadlineExceeded naming the
address: a call never takes longer than ``timeout * (retries + 1)``. Only the
request that expired is resent; others in flight are left alone. ``stream``
keeps several frames in flight on the one socket for camera loops, and yields
results in frame order.

A Client is for one thread at a time (ZeroMQ sockets are not thread-safe):
give each thread its own. For asyncio, use ``zdepth.client.aio.AsyncClient``,
the same API as coroutines. Building calls, the pipeline and decoding replies
are shared by both (``zdepth.client.base`` and the modules it uses); this
module only waits on the sockets. Imports no torch.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterable, Iterator, Union

import zmq
from zmq.utils.monitor import recv_monitor_message

from zdepth.client.base import READY_POLL_S, ClientBase
from zdepth.client.calls import Call
from zdepth.client.links import REOPEN
from zdepth.client.options import DEFAULT_ADDRESS, ClientState
from zdepth.client.replies import brokers_health
from zdepth.client.results import DepthResult, PointCloudResult
from zdepth.client.sockets import close_socket, open_dealer
from zdepth.client.streams import FrameReader, LatestSlot, StreamState
from zdepth.errors import DeadlineExceeded
from zdepth.pointcloud import Intrinsics
from zdepth.protocol import OP_RELATIVE

log = logging.getLogger(__name__)

__all__ = ["Client", "ClientState", "DEFAULT_ADDRESS"]

StreamItem = Union[DepthResult, PointCloudResult, BaseException]  # exceptions only with return_exceptions=True
IDLE_POLL_S = 1.0  # longest single wait while only frames (no replies) are awaited


class Client(ClientBase):
    """A blocking zdepth client. Use it in a ``with`` block, or call ``close()``.

    ``address``: the broker's client endpoint in any form the command line
    takes (``tcp://gpu-box:5555``, ``gpu-box:5555``, ``ipc://PATH``), or the
    name of a saved profile, whose key, model, timeout and CurveZMQ
    certificates fill in what the call leaves unchosen. Several brokers, in
    order of preference: a list (``["tcp://a:5555", "tcp://b:5555"]``) or a
    comma-separated string (``"a:5555,b:5555"``) of addresses, or a profile
    that names several; they share one key. ``key``: the shared
    secret; None reads ``ZDEPTH_KEY`` or the file named by ``ZDEPTH_KEY_FILE``.
    A broker with a key checks it at the connection's handshake too (ZeroMQ
    PLAIN); a wrong key fails calls at once with ``Unauthorized``.
    ``timeout``: seconds to wait for each attempt's reply (also sent to the
    broker, which drops work whose caller has given up). ``retries``: how many
    times a request whose attempt got no reply is sent again (each resend
    spends one, including a resend after the connection dropped), so a call
    takes at most ``timeout * (retries + 1)`` seconds from when it was made
    (for ``stream``, from when the frame was submitted). A late reply to an
    earlier attempt still counts. Error replies are never retried.

    A broker that is down or unreachable is reported sooner: a call that finds
    no working connection for ``min(timeout, 5)`` seconds (none ever made, or
    the one it had dropped and did not come back) fails with
    ``zdepth.errors.BrokerUnreachable`` ("cannot reach the broker at ..."), a
    DeadlineExceeded. A broker that restarts within that time is reconnected
    to, and what it lost is resent at once.

    With several brokers the client keeps a connection to each and sends to
    one: the first in the list that is connected, and then the same one for
    as long as it works. When it fails, the first other broker in the list
    that is connected takes every request from then on, within the same time
    bound. It fails when its connection drops (the process died, the host
    closed it) or never comes up, when ZeroMQ's heartbeats get no answer for
    6 s (a frozen host), or when a request to it times out while nothing at
    all was heard from it. What the caller sees of requests out at that
    moment: a dropped connection resends each at once to the next broker,
    spending a retry (with ``retries=0`` each fails at once with a
    DeadlineExceeded whose ``details["reason"]`` is ``"connection_lost"``); a
    silent broker's requests are resent when their attempt expires, spending a
    retry as always; requests not yet sent just go to the next broker. Either
    way each call returns one result or raises one error, by its bound. The
    client stays on the broker it moved to (its workers serve every broker,
    and one that just restarted may have none yet); a restarted broker is
    reconnected to and is used again when the one in use fails. Only when no
    broker has a connection for ``min(timeout, 5)`` seconds does a call fail
    with BrokerUnreachable, naming each. ``result.broker`` says which broker
    relayed a result; ``health_all()`` asks each broker for its health.

    ``encoder``, ``dataset``, ``input_size``, ``max_depth``: defaults for every
    call, which a call's own argument overrides; None leaves the choice to the
    server. Models are ``vits`` (Apache-2.0), ``vitb`` and ``vitl``
    (CC-BY-NC-4.0: non-commercial use only); metric models add a dataset:
    ``hypersim`` (indoor, 20 m) or ``vkitti`` (outdoor, 80 m). With
    ``encoder=None`` no model is named and the broker picks one it serves.

    ``depth_dtype="float16"`` halves the depth bytes on the wire (results are
    still float32 arrays). ``depth_codec="zstd"`` has the worker send the depth
    map losslessly compressed (byte planes + zstd, about 1.8x smaller for
    float16; needs ``pip install "zdepth[zstd]"``): it pays on a 1 GbE link or
    slower, and costs more CPU than it saves on loopback or 10 GbE.
    ``wire_format="jpeg"`` sends numpy frames as JPEG (quality 90): smaller,
    lossy, and costs an encode here and a decode there; ``"raw"`` sends the
    pixels as they are. Encoded bytes and files are always
    sent as they are. ``curve``: a ``zdepth.protocol.curve.CurveClient`` (this client's
    secret certificate and the broker's public one) for a broker that runs
    CurveZMQ; without it, calls to such a broker fail with ``Unauthorized``
    saying so.
    """

    # Options and their checks live in ClientBase.__init__; the sockets are made on first use.
    _sockets: list[zmq.Socket | None] | None = None  # one per broker, in the order of ``addresses``
    _monitors: list[zmq.Socket | None] | None = None
    _poller: zmq.Poller | None = None  # kept with the sockets: one per call would cost on every frame

    @classmethod
    def from_profile(cls, name: str, **overrides: Any) -> Client:
        """A client for a saved server profile (address, key, model, timeout, CurveZMQ certificates); ``overrides`` win."""
        return cls(**cls._profile_kwargs(name, overrides))

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> Client:
        """Connect now (otherwise the first call connects). Connecting never waits for a broker."""
        self._check_usable()
        if self._sockets is None:
            count = len(self.addresses)
            self._sockets, self._monitors, self._poller = [None] * count, [None] * count, zmq.Poller()
            try:
                for index in range(count):
                    self._open_socket(index)
            except BaseException:
                self._close_sockets()
                raise
            self._state = ClientState.OPENED
        return self

    def _open_socket(self, index: int) -> None:
        """A DEALER to broker ``index`` with the client's options and security, watched by a monitor socket."""
        assert self._sockets is not None and self._monitors is not None and self._poller is not None
        link = self._pipeline.links[index]
        sock, monitor = open_dealer(zmq.Context.instance(), link, key=self._pipeline.key, curve=self.curve)
        self._sockets[index], self._monitors[index] = sock, monitor
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(monitor, zmq.POLLIN)
        link.reset(time.monotonic())

    def _close_socket_at(self, index: int) -> None:
        assert self._sockets is not None and self._monitors is not None and self._poller is not None
        sock, monitor = self._sockets[index], self._monitors[index]
        self._sockets[index] = self._monitors[index] = None
        if sock is None:
            return
        for polled in (sock, monitor):
            try:
                self._poller.unregister(polled)
            except KeyError:
                pass
        close_socket(sock, monitor)

    def _close_sockets(self) -> None:
        if self._sockets is not None:
            for index in range(len(self._sockets)):
                self._close_socket_at(index)
        self._sockets = self._monitors = self._poller = None

    def close(self) -> None:
        """Drop the sockets and anything unsent; idempotent. A closed client cannot be reopened."""
        self._close_sockets()
        self._state = ClientState.CLOSED

    def __enter__(self) -> Client:
        return self.open()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ calls

    def relative_depth(self, image: Any, *, encoder: str | None = None, input_size: int | None = None) -> DepthResult:
        """Relative depth from the relative model (``vits``, ``vitb``, ``vitl``).

        ``image``: an HxWx3 uint8 BGR array (as cv2 reads it), JPEG/PNG bytes, a
        file path, or an ``http://`` / ``https://`` URL, which this client
        downloads (at most 64 MiB, within ``timeout``; the server never fetches).
        The depth map is disparity-like (larger is nearer) and has no unit.
        ``input_size``: network input side, a multiple of 14 (518 if None).
        """
        return self._call(self._build_relative(image, encoder=encoder, input_size=input_size))

    def metric_depth(
        self,
        image: Any,
        *,
        encoder: str | None = None,
        dataset: str | None = None,
        max_depth: float | None = None,
        input_size: int | None = None,
    ) -> DepthResult:
        """Metric depth in metres from a metric model (``{encoder}-{dataset}``, e.g. ``vits-hypersim``).

        ``max_depth`` rescales the model's output range (20 m for hypersim, 80 m
        for vkitti when None).
        """
        return self._call(
            self._build_metric(image, encoder=encoder, dataset=dataset, max_depth=max_depth, input_size=input_size)
        )

    def legacy_relative_depth(
        self,
        image: Any,
        *,
        encoder: str | None = None,
        dataset: str | None = None,
        input_size: int | None = None,
    ) -> DepthResult:
        """What the old HTTP server's ``/rel_depth`` returned: the METRIC model with ``max_depth=1.0``.

        Not the relative model: values are metric depth scaled into 0..1
        (larger is farther), unlike ``relative_depth`` (larger is nearer). For
        code ported from the HTTP client that relied on those numbers.
        """
        return self._call(
            self._build_metric(image, encoder=encoder, dataset=dataset, max_depth=1.0, input_size=input_size)
        )

    def pointcloud(
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
        """A point cloud from metric depth and pinhole intrinsics.

        ``intrinsics``: ``pointcloud.Intrinsics``, a dict with fx, fy, cx, cy, a
        4-sequence (fx, fy, cx, cy) or a 3x3 camera matrix, in pixels of this
        image. By default the server sends only the depth map and the points are
        computed here (the same bytes on the wire as ``metric_depth``);
        ``on_server=True`` asks the server for the points as well (op
        ``pointcloud``: four times the bytes). ``colors``: RGB per point, from
        the image.
        """
        return self._call(
            self._build_pointcloud(
                image,
                intrinsics,
                colors=colors,
                on_server=on_server,
                encoder=encoder,
                dataset=dataset,
                max_depth=max_depth,
                input_size=input_size,
            )
        )

    def health(self) -> dict[str, Any]:
        """The broker's health map (workers, models, queue); answered by the broker itself (with several
        brokers, by the one in use: see ``health_all``)."""
        return self._call(self._build_health())

    def health_all(self) -> dict[str, Any]:
        """Every broker's health, asked of each at once: ``{"brokers": [{"address": ..., "health": {...}}, ...]}``,
        in the order of ``addresses``; a broker that did not answer has ``"error"`` (the message) and
        ``"code"`` (``"unreachable"``, ``"timeout"``, ``"unauthorized"``, ...) instead of ``"health"``. Never
        fails over: each broker answers for itself, within the client's time bound."""
        self._begin()
        now = time.monotonic()
        exchanges = [self._pipeline.open(self._build_health(), now, pin=index) for index in range(len(self.addresses))]
        try:
            self._flush()
            while not all(exchange.done for exchange in exchanges):
                self._pump()
            return brokers_health(exchanges, self.addresses)
        finally:
            for exchange in exchanges:
                self._pipeline.forget(exchange)

    def wait_ready(self, timeout: float | None = None, *, model: str | None = None, workers: int = 1) -> dict[str, Any]:
        """Wait until the broker (the one in use) answers ``health`` with ``workers`` worker(s) ready for ``model``;
        returns that health map. For scripts, tests and benchmarks that start a broker and workers and must
        not send before they are up.

        ``model``: a model id (``"vits"``, ``"vits-hypersim"``) the workers must
        serve; None: any. ``workers=0`` waits only for the broker to answer.
        ``timeout``: seconds in all (None: the client's ``timeout``). A broker
        that answers without enough ready workers is asked again every 0.1 s; one
        that does not answer is waited for. When the time is up, raises
        ``BrokerUnreachable`` (no connection), or ``DeadlineExceeded`` (no
        answer, or not enough workers ready), saying which; other errors (a
        refused key) raise at once.
        """
        until = self._ready_bound(timeout, workers)
        started = time.monotonic()
        answered: dict[str, Any] | None = None
        failed: DeadlineExceeded | None = None
        while True:
            try:
                answered = self._call(self._build_health(), until=until)
            except DeadlineExceeded as exc:
                failed = exc
            else:
                if self._ready(answered, model, workers):
                    return answered
            left = until - time.monotonic()
            if left <= 0:
                raise self._not_ready(answered if answered is not None else failed, time.monotonic() - started, model, workers)
            time.sleep(min(READY_POLL_S, left))

    def stream(
        self,
        frames: Iterable[Any],
        *,
        op: str = OP_RELATIVE,
        max_in_flight: int = 4,
        latest_only: bool = False,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> Iterator[StreamItem]:
        """Pipelined depth for a sequence of frames: up to ``max_in_flight`` requests out at once, results in order.

        ``op``: ``"relative_depth"``, ``"metric_depth"`` or ``"pointcloud"``
        (then pass ``intrinsics=``); ``kwargs`` are that call's keyword
        arguments, the same for every frame. Each result's ``index`` is its
        frame's position in ``frames``.

        ``latest_only=False``: every frame is sent, in order; the next frame is
        read only when there is room in flight. ``latest_only=True``, for camera
        loops: a background thread reads ``frames`` as fast as they come, and
        when a frame arrives while ``max_in_flight`` requests are out, it
        replaces the unsent frame waiting for room, which is dropped (never
        sent, never yielded). So the frame sent next is always the newest, and
        results are yielded only for frames actually sent; their ``index``
        shows which were skipped. (A list is read at once, so most of it is
        skipped: latest_only is for live sources.) The reader thread stops at
        the next frame after the loop ends.

        A frame whose request fails raises its exception (typed, per error
        code), ending the stream; with ``return_exceptions=True`` the exception
        is yielded in that frame's place and the stream goes on. Errors made
        here (an unreadable image, a bad argument) always raise. Arrays are
        sent without copying: don't modify a frame until its result is yielded
        (a fresh array per frame, as ``cv2.VideoCapture.read()`` gives, is fine).
        """
        build = self._stream_builder(op, max_in_flight, kwargs)
        state = StreamState(self._pipeline, build, max_in_flight, return_exceptions)
        if latest_only:
            return self._stream_latest(frames, state)
        return self._stream_all(frames, state)

    # ------------------------------------------------------------------ driving the socket

    def _ensure_open(self) -> None:
        if self._sockets is None:
            self.open()

    def _call(self, call: Call, *, until: float = math.inf) -> Any:
        """Open the call in the pipeline, send it, and wait for its outcome (``until``: an earlier bound)."""
        self._begin()
        exchange = self._pipeline.open(call, time.monotonic(), until=until)
        try:
            self._flush()
            while not exchange.done:
                self._pump()
            return exchange.result()
        finally:
            self._pipeline.forget(exchange)

    def _put(self, target: int, frames: list[Any]) -> bool:
        """The shared ``_flush``'s socket send: broker ``target``'s socket, never blocking."""
        assert self._sockets is not None
        sock = self._sockets[target]
        if sock is None:
            return False
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def _pump(self, reader: FrameReader | None = None) -> None:
        """Wait for a reply, a connection event (or a new frame from ``reader``) until the next deadline; then
        settle replies, events and expired deadlines, in that order (``_expire``), and send what waits."""
        self._ensure_open()
        poller = self._poller
        assert poller is not None
        wait_s = min(self._pipeline.next_deadline() - time.monotonic(), IDLE_POLL_S)
        if reader is not None:
            reader.wakeup.register(poller)
        try:
            events = dict(poller.poll(max(0, math.ceil(wait_s * 1000))))
        finally:
            if reader is not None:
                reader.wakeup.unregister(poller)
        if reader is not None:
            reader.wakeup.woken(events)
        self._expire()
        self._send_waiting()

    def _read_replies(self) -> None:
        """Feed every waiting reply of every socket to the pipeline."""
        for index, sock in enumerate(self._sockets or ()):
            while sock is not None:
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._pipeline.receive(frames, time.monotonic(), index)

    def _read_monitors(self) -> None:
        """Feed every waiting connection event of every socket to the pipeline; reopen a socket when asked."""
        if self._monitors is None:
            return
        for index in range(len(self._monitors)):
            monitor = self._monitors[index]
            while monitor is not None and self._monitors is not None and self._monitors[index] is monitor:
                try:
                    message = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                action, _ = self._pipeline.link_event(index, message["event"], message["value"], time.monotonic())
                if action == REOPEN:
                    self._reopen(index)

    # ------------------------------------------------------------------ streams

    def _stream_all(self, frames: Iterable[Any], state: StreamState) -> Iterator[StreamItem]:
        self._check_usable()
        self._ensure_open()
        source = enumerate(frames)
        exhausted = False
        try:
            while True:
                yield from state.ready()
                while state.room() and not exhausted:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                    else:
                        self._begin()
                        state.submit(*item, time.monotonic())
                        self._flush()
                if exhausted and state.head is None:
                    return
                if state.head is not None and not state.head.done:
                    self._pump()
        finally:
            state.abandon()

    def _stream_latest(self, frames: Iterable[Any], state: StreamState) -> Iterator[StreamItem]:
        self._check_usable()
        self._ensure_open()
        slot = LatestSlot()
        reader = FrameReader(frames, slot)
        reader.start()
        try:
            while True:
                yield from state.ready()
                if slot.error is not None:
                    raise slot.error
                while state.room():
                    item = slot.take()
                    if item is None:
                        break
                    self._begin()
                    state.submit(*item, time.monotonic())
                    self._flush()
                if state.head is None and slot.exhausted:
                    if slot.error is not None:
                        raise slot.error
                    return
                if state.head is None or not state.head.done:
                    # Wake for new frames only while one could be sent.
                    self._pump(reader if state.room() else None)
        finally:
            state.abandon()
            reader.stop()
