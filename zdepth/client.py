"""The blocking client: ``with Client("tcp://gpu-box:5555") as c: c.metric_depth(frame)``.

One DEALER socket per client, hidden from the caller. Each attempt waits at
most ``timeout`` seconds for its reply; an attempt that gets none is retried,
up to ``retries`` times, and then the call raises DeadlineExceeded naming the
address: a call never takes longer than ``timeout * (retries + 1)``. Only the
request that expired is resent; others in flight are left alone. ``stream``
keeps several frames in flight on the one socket for camera loops, and yields
results in frame order.

A Client is for one thread at a time (ZeroMQ sockets are not thread-safe):
give each thread its own. For asyncio, use ``zdepth.aio.AsyncClient``, the
same API as coroutines. Request building and reply decoding live in
``zdepth._requests``, shared by both. Imports no torch.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from typing import Any, Iterable, Iterator, Union

import zmq
from zmq.utils.monitor import recv_monitor_message

from ._requests import (
    DEFAULT_ADDRESS,
    MONITOR_EVENTS,
    REOPEN,
    ClientBase,
    ClientState,
    Exchange,
    LatestSlot,
    Request,
    StreamState,
    configure_socket,
)
from .auth import apply_peer_security
from .pointcloud import Intrinsics
from .protocol import OP_RELATIVE
from .results import DepthResult, PointCloudResult

log = logging.getLogger(__name__)

__all__ = ["Client", "ClientState", "DEFAULT_ADDRESS"]

StreamItem = Union[DepthResult, PointCloudResult, BaseException]  # exceptions only with return_exceptions=True
IDLE_POLL_S = 1.0  # longest single wait while only frames (no replies) are awaited


class Client(ClientBase):
    """A blocking zdepth client. Use it in a ``with`` block, or call ``close()``.

    ``address``: the broker's client endpoint in any form the command line
    takes (``tcp://gpu-box:5555``, ``gpu-box:5555``, ``ipc://PATH``), or the
    name of a saved profile, whose key, model, timeout and CurveZMQ
    certificates fill in what the call leaves unchosen. ``key``: the shared
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

    ``encoder``, ``dataset``, ``input_size``, ``max_depth``: defaults for every
    call, which a call's own argument overrides; None leaves the choice to the
    server. Models are ``vits`` (Apache-2.0), ``vitb`` and ``vitl``
    (CC-BY-NC-4.0: non-commercial use only); metric models add a dataset:
    ``hypersim`` (indoor, 20 m) or ``vkitti`` (outdoor, 80 m). With
    ``encoder=None`` no model is named and the broker picks one it serves.

    ``depth_dtype="float16"`` halves the depth bytes on the wire (results are
    still float32 arrays). ``wire_format="jpeg"`` sends numpy frames as JPEG
    (quality 90): smaller, lossy, and costs an encode here and a decode there;
    ``"raw"`` sends the pixels as they are. Encoded bytes and files are always
    sent as they are. ``curve``: a ``zdepth.curve.CurveClient`` (this client's
    secret certificate and the broker's public one) for a broker that runs
    CurveZMQ; without it, calls to such a broker fail with ``Unauthorized``
    saying so.
    """

    # Options and their checks live in ClientBase.__init__; the socket is made on first use.
    _socket: zmq.Socket | None = None
    _monitor: zmq.Socket | None = None
    _poller: zmq.Poller | None = None  # kept with the socket: one per call would cost on every frame

    @classmethod
    def from_profile(cls, name: str, **overrides: Any) -> Client:
        """A client for a saved server profile (address, key, model, timeout, CurveZMQ certificates); ``overrides`` win."""
        return cls(**cls._profile_kwargs(name, overrides))

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> Client:
        """Connect now (otherwise the first call connects). Connecting never waits for the broker."""
        self._check_usable()
        if self._socket is None:
            self._open_socket()
            self._state = ClientState.OPENED
        return self

    def _open_socket(self) -> None:
        """A DEALER with the client's options and security, watched by a monitor socket."""
        sock = zmq.Context.instance().socket(zmq.DEALER)
        monitor = None
        try:
            configure_socket(sock)
            apply_peer_security(sock, key=self._pipeline.key, curve=self.curve, plain=self._pipeline.link.plain)
            monitor = sock.get_monitor_socket(MONITOR_EVENTS)
            sock.connect(self.address)
        except BaseException:
            _close_socket(sock, monitor)
            raise
        self._socket, self._monitor = sock, monitor
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(monitor, zmq.POLLIN)
        self._pipeline.link.reset(time.monotonic())

    def close(self) -> None:
        """Drop the socket and anything unsent; idempotent. A closed client cannot be reopened."""
        if self._socket is not None:
            _close_socket(self._socket, self._monitor)
            self._socket = self._monitor = self._poller = None
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
        return self._call(self._relative_request(image, encoder=encoder, input_size=input_size))

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
            self._metric_request(image, encoder=encoder, dataset=dataset, max_depth=max_depth, input_size=input_size)
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
            self._metric_request(image, encoder=encoder, dataset=dataset, max_depth=1.0, input_size=input_size)
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
            self._pointcloud_request(
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
        """The broker's health map (workers, models, queue); answered by the broker itself."""
        return self._call(self._health_request())

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

    def _ensure_socket(self) -> zmq.Socket:
        if self._socket is None:
            self.open()
        elif self._pipeline.link.failure is not None:  # refused: ZeroMQ will not retry, so a new call starts afresh
            self._reopen()
        assert self._socket is not None
        return self._socket

    def _call(self, request: Request) -> Any:
        self._check_usable()
        self._ensure_socket()
        exchange = self._pipeline.open(request, time.monotonic())
        try:
            self._flush()
            while not exchange.done:
                self._pump()
            return exchange.result()
        finally:
            self._pipeline.forget(exchange)

    def _flush(self) -> None:
        """Hand the socket every attempt waiting to go out, in order, until one would block. Connection events
        are read first, so the pipeline knows which connection a request goes out on."""
        if self._monitor is not None:
            self._read_monitor(self._monitor)
        for exchange in self._pipeline.unsent():
            self._send(exchange)
            if exchange.unsent:
                self._pipeline.send_blocked(time.monotonic())
                break

    def _send(self, exchange: Exchange) -> None:
        """Send the exchange's current attempt; it stays unsent when the socket would block (no connection yet,
        or a full queue)."""
        now = time.monotonic()
        frames = self._pipeline.message(exchange, now)
        try:
            self._ensure_socket().send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        self._pipeline.sent(exchange, now)

    def _pump(self, reader: _FrameReader | None = None) -> None:
        """Wait for a reply, a connection event (or a new frame from ``reader``) until the next deadline; then
        settle replies, events and expired deadlines, and send what waits."""
        sock, monitor, poller = self._ensure_socket(), self._monitor, self._poller
        assert poller is not None and monitor is not None
        wait_s = min(self._pipeline.next_deadline() - time.monotonic(), IDLE_POLL_S)
        if reader is not None:
            poller.register(reader.wake_fd, zmq.POLLIN)
        try:
            events = dict(poller.poll(max(0, math.ceil(wait_s * 1000))))
        finally:
            if reader is not None:
                poller.unregister(reader.wake_fd)
        if sock in events:
            while True:
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._pipeline.receive(frames, time.monotonic())
        if reader is not None and reader.wake_fd in events:
            reader.drain()
        self._pipeline.expire(time.monotonic())
        self._flush()

    def _read_monitor(self, monitor: zmq.Socket) -> None:
        while self._socket is not None and monitor is self._monitor:
            try:
                message = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            action, _ = self._pipeline.link_event(message["event"], message["value"], time.monotonic())
            if action == REOPEN:
                self._reopen()

    def _reopen(self) -> None:
        """Replace the socket (with the security the link now asks for) and resend what was pending on it."""
        if self._socket is not None:
            _close_socket(self._socket, self._monitor)
            self._socket = self._monitor = self._poller = None
        self._open_socket()
        self._pipeline.requeue()

    # ------------------------------------------------------------------ streams

    def _stream_all(self, frames: Iterable[Any], state: StreamState) -> Iterator[StreamItem]:
        self._check_usable()
        self._ensure_socket()
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
                        self._check_usable()
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
        self._ensure_socket()
        slot = LatestSlot()
        reader = _FrameReader(frames, slot)
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
                    self._check_usable()
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


def _close_socket(sock: zmq.Socket, monitor: zmq.Socket | None) -> None:
    """Close a client socket and its monitor. The monitor goes first: its inproc address is derived from the
    socket's descriptor, which the next socket may get."""
    if monitor is not None:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(linger=0)
    sock.close(linger=0)


class _FrameReader(threading.Thread):
    """Reads a frame source into a LatestSlot as fast as it yields, and wakes the stream loop.

    The wake-up is a byte on a socket pair (poll-able by ZeroMQ on every platform).
    """

    def __init__(self, frames: Iterable[Any], slot: LatestSlot) -> None:
        super().__init__(name="zdepth-frame-reader", daemon=True)
        self._frames = frames
        self._slot = slot
        self._lock = threading.Lock()
        self._stopped = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.wake_fd = self._wake_r.fileno()

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
                try:
                    self._wake_w.send(b"x")
                except BlockingIOError:  # the buffer is full: the loop is already due to wake
                    pass

    def drain(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def stop(self) -> None:
        """Stop reading at the next frame; never waits for the source (a camera read may block)."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._wake_w.close()
                self._wake_r.close()
