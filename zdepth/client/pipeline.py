"""The client's sans-IO half, shared by ``Client`` and ``AsyncClient``.

Everything here is independent of how the socket is driven: building request
frames from images and options (downloading images given by URL), the
bookkeeping of requests in flight on one socket (ids, deadlines, retries, the
time bound, matching replies, in-order delivery), what the socket's monitor
events say about the connection (handshake refusals, mismatches, a broker
that cannot be reached), and decoding replies into results. ``client.py`` drives it with blocking polls and
``aio.py`` with asyncio; neither decides anything the other does not.

numpy, cv2 and msgpack only: never torch.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import zmq

from zdepth.protocol.codec import DEFAULT_MAX_IMAGE_BYTES, DEPTH_DTYPES, decode_arrays, image_descriptor, params_frame
from zdepth.config import read_key
from zdepth.protocol.curve import CurveClient
from zdepth.errors import (
    BadRequest,
    BrokerUnreachable,
    ConfigError,
    DeadlineExceeded,
    InternalError,
    ServiceError,
    Unauthorized,
    error_from_code,
)
from zdepth.protocol.images import decode_image, encode_jpeg
from zdepth import models
from zdepth.pointcloud import Intrinsics, depth_to_points
from zdepth.protocol import (
    MAX_TIMEOUT_MS,
    OP_HEALTH,
    OP_METRIC,
    OP_POINTCLOUD,
    OP_RELATIVE,
    STATUS_OK,
    VERSION,
    request_header,
    unpack_map,
)
from zdepth.client.results import DepthResult, PointCloudResult

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://localhost:5555"
WIRE_FORMATS = ("raw", "jpeg")
JPEG_QUALITY = 90
STREAM_OPS = (OP_RELATIVE, OP_METRIC, OP_POINTCLOUD)
MAX_REPLY_HEADER_BYTES = 1024 * 1024  # a health map of a big cluster outgrows the 4 KiB request limit
SOCKET_HWM = 1000  # messages queued each way before sends report "would block"
# Largest reply frame accepted; a bigger one drops the connection (the call then times out). Generous:
# servers refuse to send frames above their own limit (64 MiB by default), so only a misbehaving peer gets here.
MAX_REPLY_FRAME_BYTES = 256 * 1024 * 1024
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000  # back off up to 2 s against a broker that is down
HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 6000  # no traffic for this long after a ping: the connection is dead
UNREACHABLE_AFTER_S = 5.0  # longest wait for a connection, when timeout is longer
SEND_RETRY_S = 0.01  # a send that would block on an open connection is tried again this soon
MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class ClientState(enum.Enum):
    """``UNOPENED`` until the first request (or ``with``), ``OPENED`` with a socket, ``CLOSED`` for good."""

    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


def new_request_id() -> str:
    """16 hex characters of a random uuid4: unique enough to match replies, short on the wire."""
    return uuid.uuid4().hex[:16]


def configure_socket(socket: zmq.Socket) -> None:
    """Options of every client DEALER (security comes from ``zdepth.auth.apply_peer_security``).

    LINGER 0: a closed socket drops its unsent requests at once. IMMEDIATE on:
    a request is handed to ZeroMQ only while a connection is up (otherwise the
    send reports "would block" and the request waits in the pipeline's outbox,
    where its deadline can still drop it), so requests never pile up in a pipe
    to a broker that is down, to be delivered, stale, when it returns; and a
    connection that drops takes with it only what was already on it, which the
    pipeline resends when the connection is back. ZMTP heartbeats make a broker
    that vanished without closing the connection (a host that froze or lost
    power) show up as a disconnection within seconds.
    """
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IMMEDIATE, 1)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_FRAME_BYTES)
    socket.setsockopt(zmq.SNDHWM, SOCKET_HWM)
    socket.setsockopt(zmq.RCVHWM, SOCKET_HWM)
    socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    """A request ready to send but for its header; ``finish`` turns the reply into a result."""

    op: str
    model: str | None
    body: tuple[Any, ...]  # frames after the header: params, image
    finish: Callable[[dict[str, Any], dict[str, np.ndarray], float, int | None], Any]
    created: float = field(default_factory=time.monotonic)  # when building began: the call's time bound starts here


def model_id(op: str, encoder: str | None, dataset: str | None) -> str | None:
    """``vits`` for relative depth, ``vits-hypersim`` for metric depth; None lets the broker pick."""
    if encoder is None:
        return None
    if op == OP_RELATIVE:
        return encoder
    return f"{encoder}-{dataset or models.DEFAULT_DATASET}"


URL_SCHEMES = ("http", "https")
MAX_URL_IMAGE_BYTES = DEFAULT_MAX_IMAGE_BYTES  # what a broker accepts: a bigger download could never be sent
URL_CHUNK_BYTES = 1024 * 1024


def is_url(image: Any) -> bool:
    """A string with a scheme (``https://...``): fetched here if http or https, refused otherwise."""
    return isinstance(image, str) and "://" in image


def _shown_url(url: str) -> str:
    """The URL for messages and logs: no user name or password, no query (signed URLs carry tokens there)."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the URL given"
    return f"{parts.scheme}://{host}{port}{parts.path}" + ("?..." if parts.query else "")


def fetch_image(url: str, *, timeout: float, max_bytes: int = MAX_URL_IMAGE_BYTES) -> bytes:
    """Download an image by ``http://`` or ``https://`` URL, as the old HTTP server took them; BadRequest says why not.

    The client fetches, never the server: the broker and workers open no
    connection on a caller's behalf. At most ``max_bytes`` (64 MiB, the
    largest image a broker accepts) are read; the download gives up after
    ``timeout`` seconds (checked between reads; each read waits at most that
    long too). Redirects are followed only to http and https; any other scheme
    (``file://``, ``ftp://``, ...) is refused.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    shown = _shown_url(url)
    scheme = url.partition("://")[0].lower()
    if scheme not in URL_SCHEMES:
        raise BadRequest(
            f"cannot fetch {shown}: only http:// and https:// images are fetched; for a local file give its path",
            details={"url": shown},
        )
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError as exc:
        raise BadRequest(f"cannot fetch {shown}: {exc}", details={"url": shown}) from None
    if not host:
        raise BadRequest(f"cannot fetch {shown}: the URL names no host", details={"url": shown})

    class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
            if newurl.partition("://")[0].lower() not in URL_SCHEMES:
                raise BadRequest(f"cannot fetch {shown}: it redirects to {_shown_url(newurl)}, which is not http or https", details={"url": shown})
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"Accept": "image/*", "User-Agent": "zdepth-client"})
    deadline = time.monotonic() + timeout
    too_big = f"cannot fetch {shown}: the image is larger than {max_bytes} bytes, the most a broker accepts"
    try:
        with opener.open(request, timeout=timeout) as response:
            kind = response.headers.get("Content-Type", "")
            if kind.startswith("text/"):
                raise BadRequest(f"cannot fetch {shown}: the server sent {kind.split(';')[0]}, not an image", details={"url": shown})
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise BadRequest(too_big, details={"url": shown})
            chunks, total = [], 0
            while chunk := response.read(min(URL_CHUNK_BYTES, max_bytes + 1 - total)):
                total += len(chunk)
                if total > max_bytes:
                    raise BadRequest(too_big, details={"url": shown})
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
    except urllib.error.HTTPError as exc:
        raise BadRequest(f"cannot fetch {shown}: HTTP {exc.code} {exc.reason}", details={"url": shown, "http_status": exc.code}) from None
    except TimeoutError:
        raise BadRequest(f"cannot fetch {shown}: no complete answer in {timeout:g} s", details={"url": shown}) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise BadRequest(f"cannot fetch {shown}: no answer in {timeout:g} s", details={"url": shown}) from None
        raise BadRequest(f"cannot fetch {shown}: {reason}", details={"url": shown}) from None
    except OSError as exc:  # the connection broke mid-way
        raise BadRequest(f"cannot fetch {shown}: {exc}", details={"url": shown}) from None
    if not total:
        raise BadRequest(f"cannot fetch {shown}: the server sent no bytes", details={"url": shown})
    return b"".join(chunks)


def prepare_image(image: Any, wire_format: str) -> tuple[dict[str, Any], Any]:
    """The image descriptor for the params frame and the image frame.

    Arrays travel raw (``wire_format="raw"``) or as JPEG at quality 90
    (``"jpeg"``, smaller on the wire, lossy); encoded bytes and files travel
    as they are.
    """
    if isinstance(image, (str, os.PathLike)):
        return image_descriptor(Path(image).read_bytes())
    if isinstance(image, np.ndarray):
        if wire_format == "jpeg":
            return image_descriptor(encode_jpeg(image, JPEG_QUALITY))
        return image_descriptor(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return image_descriptor(image)
    raise TypeError(
        f"image must be a BGR uint8 numpy array, JPEG/PNG bytes, a file path or an http(s) URL, got {type(image).__name__}"
    )


def image_pixels(image: Any) -> np.ndarray:
    """The image as HxWx3 uint8 BGR on this side (for point cloud colours and sizes)."""
    if isinstance(image, (str, os.PathLike)):
        image = Path(image).read_bytes()
    return decode_image(image, max_pixels=None)


def coerce_intrinsics(intrinsics: Any) -> Intrinsics:
    """Intrinsics from an ``Intrinsics``, a mapping with fx, fy, cx, cy, a 4-sequence or a 3x3 matrix."""
    if isinstance(intrinsics, Intrinsics):
        return intrinsics
    if isinstance(intrinsics, Mapping):
        missing = [name for name in ("fx", "fy", "cx", "cy") if name not in intrinsics]
        if missing:
            raise BadRequest(f"intrinsics mapping lacks {missing}; give fx, fy, cx and cy in pixels")
        return Intrinsics(*(intrinsics[name] for name in ("fx", "fy", "cx", "cy")))
    try:
        array = np.asarray(intrinsics, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"intrinsics must be fx, fy, cx, cy or a 3x3 matrix, got {intrinsics!r}") from exc
    if array.shape == (3, 3):
        return Intrinsics.from_matrix(array)
    if array.shape == (4,):
        return Intrinsics(*array.tolist())
    raise BadRequest(
        f"intrinsics must be an Intrinsics, a dict with fx, fy, cx, cy, a 4-sequence or a 3x3 matrix; got shape {array.shape}"
    )


# ----------------------------------------------------------------------------- replies


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def depth_from_reply(header: dict[str, Any], arrays: dict[str, np.ndarray], round_trip_ms: float, index: int | None) -> DepthResult:
    """The DepthResult of a reply: the ``depth`` array as writable float32, min/max, model, worker, timings."""
    wire = arrays.get("depth")
    if wire is None or wire.ndim != 2:
        raise InternalError(f"the reply has no HxW 'depth' array (arrays: {sorted(arrays)})")
    depth = np.array(wire, dtype=np.float32)  # owned and writable, float32 even from float16 on the wire
    return _depth_result(depth, header, round_trip_ms, index)


def _depth_result(depth: np.ndarray, header: dict[str, Any], round_trip_ms: float, index: int | None) -> DepthResult:
    low, high = _number(header.get("min")), _number(header.get("max"))
    if low is None or high is None:
        finite = depth[np.isfinite(depth)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)
    raw_timings = header.get("timings")
    timings = {}
    if isinstance(raw_timings, dict):
        timings = {str(k): float(v) for k, v in raw_timings.items() if _number(v) is not None}
    timings["round_trip_ms"] = round_trip_ms
    return DepthResult(
        depth=depth,
        min=low,
        max=high,
        model=str(header.get("model") or ""),
        worker=str(header.get("worker") or ""),
        timings=timings,
        index=index,
    )


def finish_depth(header: dict[str, Any], arrays: dict[str, np.ndarray], round_trip_ms: float, index: int | None) -> DepthResult:
    return depth_from_reply(header, arrays, round_trip_ms, index)


def finish_health(header: dict[str, Any], arrays: dict[str, np.ndarray], round_trip_ms: float, index: int | None) -> dict:
    health = header.get("health")
    if not isinstance(health, dict):
        raise InternalError("the health reply has no 'health' map; is the address a zdepth broker?")
    return health


@dataclass(frozen=True)
class _PointCloudFinisher:
    """Builds a PointCloudResult from a depth reply (client side) or a points reply (server side)."""

    image: Any
    intrinsics: Intrinsics
    colors: bool
    on_server: bool

    def __call__(self, header: dict[str, Any], arrays: dict[str, np.ndarray], round_trip_ms: float, index: int | None) -> PointCloudResult:
        pixels = image_pixels(self.image) if self.colors else None
        if not self.on_server:
            depth = depth_from_reply(header, arrays, round_trip_ms, index)
            points, rgb = depth_to_points(depth.depth, self.intrinsics, colors=pixels)
            return PointCloudResult(points=points, colors=rgb, depth=depth)
        wire = arrays.get("points")
        if wire is None or wire.ndim != 2 or wire.shape[1] != 3:
            raise InternalError(f"the pointcloud reply has no (N, 3) 'points' array (arrays: {sorted(arrays)})")
        points = np.array(wire, dtype=np.float32)
        if "depth" in arrays:
            depth = depth_from_reply(header, arrays, round_trip_ms, index)
        else:  # Z is the depth: rebuild the map from the points and the image's size
            height, width = (pixels if pixels is not None else image_pixels(self.image)).shape[:2]
            if height * width != len(points):
                raise InternalError(f"{len(points)} points do not match the {height}x{width} image")
            depth = _depth_result(points[:, 2].reshape(height, width).copy(), header, round_trip_ms, index)
        rgb = None
        if self.colors:
            wire_colors = arrays.get("colors")
            if wire_colors is not None and wire_colors.shape == points.shape and wire_colors.dtype == np.uint8:
                rgb = np.array(wire_colors)
            else:
                rgb = np.ascontiguousarray(pixels[..., ::-1]).reshape(-1, 3)
            if len(rgb) != len(points):
                raise InternalError(f"{len(points)} points but {len(rgb)} colours: the image and the reply disagree")
        return PointCloudResult(points=points, colors=rgb, depth=depth)


# ----------------------------------------------------------------------------- options and request building


def resolve_addresses(address: str | Sequence[str]) -> tuple[tuple[str, ...], Any]:
    """(broker endpoints in order of preference, the profile or None) for what a caller gave as the server.

    One string without a comma is an address or a profile name, by the
    command line's rules (``zdepth.profiles.resolve_server``); a profile may
    name several brokers. A comma-separated string (``"a:5555,b:5555"``) or a
    list names several brokers, each an address (a profile name there would
    leave open whose key and model apply). ConfigError, one line, otherwise.
    """
    from zdepth.profiles import looks_like_address, normalize_address, resolve_server

    if isinstance(address, str):
        parts = address.split(",")
    elif isinstance(address, (list, tuple)) and address and all(isinstance(item, str) for item in address):
        parts = [part for item in address for part in item.split(",")]
    else:
        raise ConfigError(
            f"give the broker as an address string, a profile name or a list of addresses, got {type(address).__name__} {address!r}"
        )
    parts = [part.strip() for part in parts]
    if len(parts) == 1:
        endpoint, profile = resolve_server(parts[0])
        several = getattr(profile, "addresses", None) if profile is not None else None
        return (tuple(several) if several else tuple(endpoint.split(","))), profile
    endpoints: list[str] = []
    for part in parts:
        if not part:
            raise ConfigError(f"{address!r} holds an empty address; separate brokers with one comma: tcp://a:5555,tcp://b:5555")
        if not looks_like_address(part):
            raise ConfigError(
                f"{part!r} in a list of brokers is not an address: give each as HOST:PORT or tcp://HOST:PORT "
                "(a profile names its brokers with addresses = [...])"
            )
        endpoint = normalize_address(part)
        if endpoint in endpoints:
            raise ConfigError(f"{address!r} names the broker {endpoint} twice")
        endpoints.append(endpoint)
    return tuple(endpoints), None


class _Unchosen:
    """Marks a constructor default the caller did not choose, so a profile's own value may take its place.

    The defaults below are instances of float and str subclasses: they print
    and compare as the plain values, and an argument the caller wrote, even
    the same value, is a plain float or str.
    """

    __slots__ = ()


class _UnchosenFloat(_Unchosen, float):
    __slots__ = ()


class _UnchosenStr(_Unchosen, str):
    __slots__ = ()


DEFAULT_TIMEOUT = _UnchosenFloat(30.0)
DEFAULT_ENCODER = _UnchosenStr(models.DEFAULT_ENCODER)
_DEFAULT_DATASET = _UnchosenStr(models.DEFAULT_DATASET)


class ClientBase:
    """Options, lifecycle state and request building shared by Client and AsyncClient."""

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        *,
        key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 1,
        encoder: str | None = DEFAULT_ENCODER,
        dataset: str | None = _DEFAULT_DATASET,
        input_size: int | None = None,
        max_depth: float | None = None,
        depth_dtype: str = "float32",
        wire_format: str = "raw",
        curve: CurveClient | None = None,
    ) -> None:
        addresses, profile = resolve_addresses(address)
        if profile is not None:  # what the caller left unchosen comes from the profile
            key = key if key is not None else profile.key
            curve = curve if curve is not None else profile.curve
            if profile.timeout is not None and isinstance(timeout, _Unchosen):
                timeout = profile.timeout
            profile_encoder, profile_dataset = models.split_model_id(profile.model)
            if profile_encoder is not None and isinstance(encoder, _Unchosen):
                encoder = profile_encoder
                if profile_dataset is not None and isinstance(dataset, _Unchosen):
                    dataset = profile_dataset
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if depth_dtype not in DEPTH_DTYPES:
            raise ValueError(f"depth_dtype must be one of {sorted(DEPTH_DTYPES)}, got {depth_dtype!r}")
        if wire_format not in WIRE_FORMATS:
            raise ValueError(f"wire_format must be one of {list(WIRE_FORMATS)}, got {wire_format!r}")
        self.addresses = addresses  # in order of preference
        self.address = ",".join(addresses)  # the form the constructor and --server take back
        self.profile = profile.name if profile is not None else None
        self.timeout = float(timeout)
        self.retries = retries
        self.encoder = None if encoder is None else str(encoder)
        self.dataset = None if dataset is None else str(dataset)
        self.input_size = input_size
        self.max_depth = max_depth
        self.depth_dtype = depth_dtype
        self.wire_format = wire_format
        self.curve = curve
        self._state = ClientState.UNOPENED
        self._pipeline = Pipeline(addresses=addresses, key=read_key(key), timeout=self.timeout, retries=retries, curve=curve)

    @staticmethod
    def _profile_kwargs(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments from a saved server profile (zdepth.profiles): address, key, model,
        timeout and CurveZMQ certificates, each overridden by ``overrides``."""
        from zdepth.profiles import load_profile  # lazy: profiles are optional for plain clients

        profile = load_profile(name)
        kwargs: dict[str, Any] = {"address": ",".join(getattr(profile, "addresses", None) or (profile.address,)), "key": profile.key}
        encoder, dataset = models.split_model_id(profile.model)
        if encoder is not None:
            kwargs["encoder"] = encoder
            if dataset is not None:
                kwargs["dataset"] = dataset
        if profile.timeout is not None:
            kwargs["timeout"] = profile.timeout
        if profile.curve is not None:  # CurveZMQ certificates (curve_secret, curve_server_key)
            kwargs["curve"] = profile.curve
        kwargs.update(overrides)
        return kwargs

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is ClientState.CLOSED

    def _check_usable(self) -> None:
        if self._state is ClientState.CLOSED:
            raise RuntimeError(f"this client for {self.address} is closed; create a new one")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r}, state={self._state.value})"

    # Requests. A call's None falls back to the constructor's value, and then the server's.

    def _depth_request(
        self,
        op: str,
        image: Any,
        *,
        encoder: str | None = None,
        dataset: str | None = None,
        max_depth: float | None = None,
        input_size: int | None = None,
        intrinsics: Intrinsics | None = None,
        finish: Callable[..., Any] = finish_depth,
        created: float | None = None,
    ) -> Request:
        created = time.monotonic() if created is None else created
        if is_url(image):
            image = fetch_image(image, timeout=self.timeout)
        desc, payload = prepare_image(image, self.wire_format)
        params = params_frame(
            desc,
            input_size=input_size if input_size is not None else self.input_size,
            max_depth=None if op == OP_RELATIVE else (max_depth if max_depth is not None else self.max_depth),
            intrinsics=(intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy) if intrinsics is not None else None,
            depth_dtype=self.depth_dtype,
        )
        model = model_id(op, encoder or self.encoder, dataset or self.dataset)
        return Request(op=op, model=model, body=(params, payload), finish=finish, created=created)

    def _relative_request(
        self, image: Any, *, encoder: str | None = None, input_size: int | None = None, created: float | None = None
    ) -> Request:
        return self._depth_request(OP_RELATIVE, image, encoder=encoder, input_size=input_size, created=created)

    def _metric_request(self, image: Any, **kwargs: Any) -> Request:
        return self._depth_request(OP_METRIC, image, **kwargs)

    def _pointcloud_request(
        self, image: Any, intrinsics: Any, *, colors: bool = True, on_server: bool = False, **kwargs: Any
    ) -> Request:
        intr = coerce_intrinsics(intrinsics)
        kwargs.setdefault("created", time.monotonic())
        if is_url(image):  # fetched once, for the request and for the colours
            image = fetch_image(image, timeout=self.timeout)
        finish = _PointCloudFinisher(image=image, intrinsics=intr, colors=bool(colors), on_server=bool(on_server))
        if on_server:
            return self._depth_request(OP_POINTCLOUD, image, intrinsics=intr, finish=finish, **kwargs)
        return self._depth_request(OP_METRIC, image, finish=finish, **kwargs)

    def _health_request(self) -> Request:
        return Request(op=OP_HEALTH, model=None, body=(), finish=finish_health)

    def _stream_builder(self, op: str, max_in_flight: int, kwargs: dict[str, Any]) -> Callable[[Any], Request]:
        """Validate a stream's arguments up front; returns frame -> Request."""
        if op not in STREAM_OPS:
            raise ValueError(f"stream op must be one of {list(STREAM_OPS)}, got {op!r}")
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        allowed = {"encoder", "input_size"}
        if op != OP_RELATIVE:
            allowed |= {"dataset", "max_depth"}
        if op == OP_POINTCLOUD:
            allowed |= {"intrinsics", "colors", "on_server"}
            if "intrinsics" not in kwargs:
                raise TypeError("stream(op='pointcloud') needs intrinsics=")
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"stream(op={op!r}) got unexpected keyword arguments {unknown}; it takes {sorted(allowed)}")
        if op == OP_POINTCLOUD:
            kwargs = {**kwargs, "intrinsics": coerce_intrinsics(kwargs["intrinsics"])}
            return lambda frame: self._pointcloud_request(frame, **kwargs)
        return lambda frame: self._depth_request(op, frame, **kwargs)


# ----------------------------------------------------------------------------- the connections


class Link:
    """What the client knows of its connection to one broker, from the socket's monitor events and its replies.

    Sans-IO: the driver feeds every monitor event to ``event``; ``up`` says
    whether a connection has passed its handshake, ``down_since`` since when
    none has. ``plain`` is whether the next socket should offer the key at the
    handshake (ZeroMQ PLAIN): a broker without a key answers PLAIN with a
    mechanism mismatch, and the client then reconnects without it. A refused
    handshake, or a CurveZMQ setting only one side has, leaves a ``failure``
    (an exception) that fails what is pending, and makes the next call open a
    fresh socket (ZeroMQ does not reconnect after a refusal). ``silent``: a
    request to it expired while nothing at all was heard from it, so a client
    with other brokers sends elsewhere until it is heard again.
    """

    def __init__(self, address: str, *, key: str | None, curve: CurveClient | None, now: float) -> None:
        self.address = address
        self.curve = curve
        self.has_key = key is not None
        self.plain = key is not None and curve is None
        self.reset(now)

    def reset(self, now: float) -> None:
        """A fresh socket: nothing connected yet."""
        self.up = False
        self.down_since: float | None = now
        self.opened_at = now
        self.ever_up = False
        self.connects = 0
        self.connect_retries = 0
        self.handshake_failures = 0
        self.failure: tuple[type[ServiceError], str, dict[str, Any]] | None = None
        self.failed_at = math.inf
        self.heard_at = -math.inf  # the last reply of any kind
        self.silent = False

    @property
    def usable(self) -> bool:
        return self.up and not self.silent

    def heard(self, now: float) -> None:
        """A reply came in on this connection: the broker is alive."""
        self.heard_at = now
        self.silent = False

    def event(self, event: int, value: int, now: float) -> str | None:
        """Take one monitor event; returns REOPEN when the socket must be replaced (with ``plain`` now False)."""
        from zdepth.protocol import auth

        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.up, self.down_since, self.ever_up, self.failure, self.silent = True, None, True, None, False
        elif event == zmq.EVENT_DISCONNECTED:
            if self.up:
                self.up, self.down_since = False, now
        elif event == zmq.EVENT_CONNECTED:
            self.connects += 1
        elif event == zmq.EVENT_CONNECT_RETRIED:
            self.connect_retries += 1
        elif auth.key_refused(event, value):
            self.handshake_failures += 1
            self.failure, self.failed_at = self._refused(), now
        elif auth.mechanism_mismatch(event, value):
            self.handshake_failures += 1
            if self.plain:
                self.plain = False
                log.info(
                    "the broker at %s does not ask for the key at the handshake (an older or keyless broker); "
                    "reconnecting without it: the key still travels in each request", self.address,
                )
                return REOPEN
            self.failure, self.failed_at = self._mismatch(), now
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            self.handshake_failures += 1
        return None

    def _refused(self) -> tuple[type[ServiceError], str, dict[str, Any]]:
        details = {"address": self.address, "reason": "handshake_refused"}
        if self.curve is not None:
            return Unauthorized, (
                f"the broker at {self.address} refused this client's CurveZMQ certificate: put the public half of "
                f"{self.curve.secret_file} (NAME.key) in the broker's --curve-allow folder and restart the broker"
            ), details
        return Unauthorized, (
            f"the broker at {self.address} refused the key; check ZDEPTH_KEY / ZDEPTH_KEY_FILE (or key / key_file in "
            "the profile, or key=) against the broker's key"
        ), details

    def _mismatch(self) -> tuple[type[ServiceError], str, dict[str, Any]]:
        details = {"address": self.address, "reason": "security_mismatch"}
        curve_hint = (
            "pass curve=CurveClient(secret_file, server_public_file) (zdepth.curve; or the profile fields "
            "curve_secret and curve_server_key), with this client's secret certificate from `zdepth keygen` "
            "and the broker's public one"
        )
        if self.curve is not None:
            return Unauthorized, (
                f"this client uses CurveZMQ but the broker at {self.address} does not: start the broker with "
                "--curve-secret (and --curve-allow), or drop curve= (and the profile's curve_secret and curve_server_key)"
            ), details
        if self.has_key:
            return Unauthorized, f"the broker at {self.address} uses CurveZMQ and this client does not: {curve_hint}", details
        return Unauthorized, (
            f"the broker at {self.address} asks for a key or CurveZMQ at the handshake, and this client has neither: "
            f"set ZDEPTH_KEY or ZDEPTH_KEY_FILE (or key / key_file in the profile, or key=); if the broker runs CurveZMQ, {curve_hint}"
        ), details

    def what_failed(self, waited: float) -> str:
        """Why no working connection came up in ``waited`` seconds, in a few words."""
        if self.failure is not None:
            if self.failure[2].get("reason") == "security_mismatch":
                return "its handshake security is not this client's (CurveZMQ on one side only)"
            return f"it refused this client's {'CurveZMQ certificate' if self.curve is not None else 'key'}"
        if self.ever_up:
            return f"the connection dropped and was not re-established in {waited:.1f} s"
        if self.handshake_failures:
            return (
                f"{self.handshake_failures} connection(s) were made but the security handshake never completed in {waited:.1f} s"
                + ("; with CurveZMQ, check that curve_server_key is the broker's public certificate" if self.curve is not None else "")
            )
        if self.connects:
            return f"a connection was made but its handshake did not complete in {waited:.1f} s"
        return f"no connection in {waited:.1f} s" + (f" ({self.connect_retries} retries)" if self.connect_retries else "")

    def unreachable(self, waited: float) -> tuple[type[ServiceError], str, dict[str, Any]]:
        """The error for a request that found no working connection for ``waited`` seconds."""
        details = {"address": self.address, "waited_s": waited, "reason": "unreachable"}
        return BrokerUnreachable, (
            f"cannot reach the broker at {self.address}: {self.what_failed(waited)}; check that the broker runs there "
            f"(zdepth health --server {self.address}), the address and port, and any firewall between"
        ), details


REOPEN = "reopen"
FIRST_CHOICE_GRACE_S = 0.25  # how long a fresh client waits for an earlier broker in its list before using a later one
REFUSED_RETRY_S = 5.0  # with other brokers to use, a broker that refused the handshake is tried again this seldom


# ----------------------------------------------------------------------------- requests in flight


class Exchange:
    """One request until it is settled: its attempts (each with its own wire id), deadlines and outcome."""

    __slots__ = (
        "id", "ids", "request", "index", "retries_left", "attempts", "opened", "final", "sent_at", "deadline",
        "done", "value", "error", "waiter", "via", "pin",
    )  # fmt: skip

    def __init__(self, request: Request, retries: int, index: int | None, opened: float, final: float, pin: int | None = None) -> None:
        self.id = ""  # the current attempt's id
        self.ids: dict[str, float | None] = {}  # every attempt's id: when it was handed to the socket (None: not yet)
        self.request = request
        self.index = index
        self.retries_left = retries
        self.attempts = 0
        self.opened = opened  # when the call (or the stream's frame) began: the time bound counts from here
        self.final = final  # opened + timeout * (retries + 1): nothing about this request outlives it
        self.sent_at = 0.0
        self.deadline = math.inf  # the current attempt's
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.waiter: Any = None  # for the driver: an asyncio future in aio.py
        self.via: int | None = None  # the broker (its index) the current attempt was handed to
        self.pin = pin  # a broker this request is for, whatever happens to it (health of each broker)

    @property
    def unsent(self) -> bool:
        return self.ids.get(self.id) is None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Pipeline:
    """Requests in flight on one socket per broker, in the order they were opened, and the state of each connection.

    Sans-IO. The driver keeps one socket per address, in order. It sends, in
    order, ``message(ex)`` for each exchange in ``unsent()`` on the socket of
    ``route(ex)`` (None: none to send it on yet) and calls ``sent(ex, i)`` for
    each the socket took (one that would block stays, and ``send_blocked``
    says when to try again); it feeds every reply to ``receive`` and every
    monitor event to ``link_event``, each with the index of its socket, and
    calls ``expire`` whenever ``next_deadline`` passes.

    The time bound: a request opened at ``t`` is settled by
    ``t + timeout * (retries + 1)``, whatever happens. Each attempt waits at
    most ``timeout`` (less when the bound is nearer) and tells the broker so
    in ``timeout_ms``. Only an attempt that expired, or whose connection
    dropped under it, is resent, and each resend spends a retry. A resend goes
    out with a new id: a late reply to an earlier attempt still counts if it
    is a result, and is dropped if it is an error (the current attempt
    decides), so a broker's "timeout" for an attempt the client has already
    replaced cannot fail the call.

    Several brokers: requests go to one, the *active* broker. It stays active
    while its connection is up and it is not silent; otherwise the first broker
    in the list that is connected (and not silent) becomes active, and every
    send from then on, resends included, goes there. So a connection that
    drops moves what it held to the next broker at once (each such resend
    spends a retry, as above), and an attempt that expires while nothing at
    all was heard from its broker marks that broker silent, so the retry goes
    to another. The client does not move back to an earlier broker when it
    returns (workers serve every broker, and one that just restarted may have
    none yet); it moves only when the active one fails. At the start, an
    earlier broker gets ``FIRST_CHOICE_GRACE_S`` to connect before a later
    one is used.
    """

    def __init__(
        self, *, addresses: Sequence[str] | str, key: str | None, timeout: float, retries: int, curve: CurveClient | None = None
    ) -> None:
        self.addresses = (addresses,) if isinstance(addresses, str) else tuple(addresses)
        if not self.addresses:
            raise ValueError("a pipeline needs at least one broker address")
        self.address = ",".join(self.addresses)
        self.key = key
        self.timeout = timeout
        self.retries = retries
        self.unreachable_after = min(timeout, UNREACHABLE_AFTER_S)
        now = time.monotonic()
        self.links = [Link(address, key=key, curve=curve, now=now) for address in self.addresses]
        self.active = 0  # the broker new attempts go to
        self._exchanges: dict[int, Exchange] = {}  # by id(exchange), in the order opened
        self._by_wire_id: dict[str, Exchange] = {}
        self._outbox: deque[Exchange] = deque()
        self._retry_sends_at = math.inf
        self._grace_until = math.inf

    def __len__(self) -> int:
        return len(self._exchanges)

    @property
    def several(self) -> bool:
        return len(self.links) > 1

    # -- choosing a broker

    def route(self, exchange: Exchange, now: float) -> int | None:
        """The socket (index) to send the exchange's current attempt on now; None: wait for a connection."""
        if exchange.pin is not None:
            return exchange.pin
        return self.choose(now)

    def choose(self, now: float) -> int | None:
        """The active broker: the current one while usable, else the first usable in the list (see the class)."""
        self._grace_until = math.inf
        if not self.several or self.links[self.active].usable:
            return self.active
        candidates = [i for i, link in enumerate(self.links) if link.usable] or [i for i, link in enumerate(self.links) if link.up]
        if not candidates:
            return self.active  # none connected: the send waits in ZeroMQ's place (IMMEDIATE), until one is
        best = candidates[0]
        waiting = [link.opened_at + FIRST_CHOICE_GRACE_S for link in self.links[:best] if not link.ever_up and link.failure is None]
        if waiting and max(waiting) > now:
            self._grace_until = max(waiting)
            return None
        if best != self.active:
            old = self.links[self.active]
            why = "was silent while a request to it waited" if old.up else "has no connection"
            if old.failure is not None:
                why = "refused the handshake"
            (log.warning if old.ever_up else log.info)("the broker at %s %s; sending to the broker at %s", old.address, why, self.links[best].address)
            self.active = best
        return best

    def refused(self, now: float) -> list[int]:
        """Brokers whose refused handshake a new request should try again, on a fresh socket: a lone broker
        always (the caller may have fixed the key), one of several when no other is connected or every
        ``REFUSED_RETRY_S``."""
        others_up = any(link.up for link in self.links)
        return [
            i for i, link in enumerate(self.links)
            if link.failure is not None and (not self.several or not others_up or now - link.failed_at >= REFUSED_RETRY_S)
        ]  # fmt: skip

    # -- opening and sending

    def open(self, request: Request, now: float, *, index: int | None = None, pin: int | None = None) -> Exchange:
        """Track a new request; its first attempt waits in ``unsent()``. The bound counts from ``request.created``.
        ``pin``: the broker it must go to (no failover), by index."""
        opened = min(request.created, now)
        exchange = Exchange(request, self.retries, index, opened, opened + self.timeout * (self.retries + 1), pin)
        self._exchanges[id(exchange)] = exchange
        self._start_attempt(exchange, now)
        return exchange

    def _start_attempt(self, exchange: Exchange, now: float) -> None:
        if exchange.id and exchange.unsent:  # the previous attempt never left: forget its id
            self._by_wire_id.pop(exchange.id, None)
            exchange.ids.pop(exchange.id, None)
        exchange.id = new_request_id()
        exchange.ids[exchange.id] = None
        exchange.via = None
        self._by_wire_id[exchange.id] = exchange
        exchange.attempts += 1
        exchange.deadline = min(now + self.timeout, exchange.final)
        if exchange not in self._outbox:
            self._outbox.append(exchange)

    def unsent(self) -> list[Exchange]:
        """Exchanges whose current attempt still has to be handed to a socket, in order. The driver is about
        to try them all, so an earlier ``send_blocked`` is forgotten."""
        self._retry_sends_at = math.inf
        return [ex for ex in self._outbox if not ex.done]

    def message(self, exchange: Exchange, now: float) -> list[Any]:
        """The frames of the current attempt. ``timeout_ms`` is what is left of it, rounded up, so the broker
        never gives up on an attempt before the client does."""
        request = exchange.request
        timeout_ms = None
        if request.op != OP_HEALTH:
            timeout_ms = max(1, min(MAX_TIMEOUT_MS, math.ceil((exchange.deadline - now) * 1000)))
        header = request_header(id=exchange.id, key=self.key, op=request.op, model=request.model, timeout_ms=timeout_ms)
        return [header, *request.body]

    def sent(self, exchange: Exchange, now: float, link: int = 0) -> None:
        """The socket of broker ``link`` took the current attempt."""
        exchange.ids[exchange.id] = now
        exchange.sent_at = now
        exchange.via = link
        try:
            self._outbox.remove(exchange)
        except ValueError:
            pass
        if not self._outbox:
            self._retry_sends_at = math.inf

    def send_blocked(self, now: float, link: int = 0) -> None:
        """A socket would not take a message: try again soon if its connection is up (a full queue), else
        when a connection comes up."""
        if self.links[link].up:
            self._retry_sends_at = min(self._retry_sends_at, now + SEND_RETRY_S)

    def requeue(self, link: int = 0) -> None:
        """Broker ``link``'s socket was replaced: what went out on it goes out again (same id, same deadline)."""
        for exchange in self.pending():
            if exchange.via == link and exchange not in self._outbox:
                exchange.ids[exchange.id] = None
                exchange.via = None
                self._outbox.append(exchange)

    def forget(self, exchange: Exchange) -> None:
        """Stop tracking a request (its result was taken, or its caller gave up); a late reply is dropped."""
        self._exchanges.pop(id(exchange), None)
        for wire_id in exchange.ids:
            if self._by_wire_id.get(wire_id) is exchange:
                del self._by_wire_id[wire_id]
        try:
            self._outbox.remove(exchange)
        except ValueError:
            pass

    def pending(self) -> list[Exchange]:
        return [ex for ex in self._exchanges.values() if not ex.done]

    def _down_since(self, links: Sequence[Link] | None = None) -> float | None:
        """Since when none of ``links`` (all brokers) has had a working connection (None: one has)."""
        links = self.links if links is None else links
        if any(link.up for link in links):
            return None
        return max(link.down_since for link in links if link.down_since is not None)

    def _down_for(self, exchange: Exchange, every: float | None) -> float | None:
        """``_down_since`` of the brokers the exchange may go to, given ``every``, that of all brokers."""
        return every if exchange.pin is None else self._down_since([self.links[exchange.pin]])

    def next_deadline(self) -> float:
        """When ``expire`` next has something to do (or a blocked send is due another try)."""
        when = min(self._retry_sends_at, self._grace_until)
        every = self._down_since()
        for exchange in self._exchanges.values():
            if exchange.done:
                continue
            when = min(when, exchange.deadline)
            down = self._down_for(exchange, every)
            if down is not None:
                when = min(when, max(down, exchange.opened) + self.unreachable_after)
        return when

    # -- replies, events and deadlines

    def receive(self, frames: Sequence[Any], now: float, link: int = 0) -> Exchange | None:
        """Match a reply from broker ``link`` to its request and settle it; returns the exchange, or None if the
        reply was dropped."""
        address = self.links[link].address
        self.links[link].heard(now)
        try:
            header = unpack_map(memoryview(frames[0]), what="reply header", limit=MAX_REPLY_HEADER_BYTES)
        except BadRequest as exc:
            log.warning("dropping a malformed reply from %s: %s", address, exc)
            return None
        request_id, status = header.get("id"), header.get("status")
        exchange = self._by_wire_id.get(request_id) if isinstance(request_id, str) else None
        if exchange is None and request_id is None and status != STATUS_OK:
            # an error the server could not pin on an id: unambiguous only if one request is out there
            out = [ex for ex in self.pending() if ex.via == link and not ex.unsent]
            if len(out) == 1:
                exchange, request_id = out[0], out[0].id
        if exchange is None or exchange.done:
            log.debug("dropping a reply for an unknown or settled request %r from %s", request_id, address)
            return None
        if status != STATUS_OK and header.get("v") == VERSION:
            if request_id != exchange.id:
                log.debug("dropping a %s reply to an earlier attempt of %s; the current one decides", status, exchange.id)
                return None
            if status == "timeout" and now >= exchange.deadline:
                return None  # the attempt's own deadline passed as well: expire() retries it, or fails it
        self._settle(exchange, header, frames, now, request_id, address)
        return exchange

    def _settle(self, exchange: Exchange, header: dict[str, Any], frames: Sequence[Any], now: float, request_id: Any, address: str) -> None:
        exchange.done = True
        status = header.get("status")
        if header.get("v") != VERSION:
            exchange.error = InternalError(
                f"{address} speaks protocol version {header.get('v')!r}; this client speaks {VERSION}: "
                "upgrade the older side"
            )
        elif status != STATUS_OK:
            details = header.get("details")
            exchange.error = error_from_code(
                str(status), str(header.get("message") or "the server gave no message"), details if isinstance(details, dict) else None
            )
        else:
            sent_at = exchange.ids.get(request_id) or exchange.sent_at
            round_trip_ms = (now - sent_at) * 1000.0
            try:
                arrays = decode_arrays(header.get("arrays", []), [memoryview(f) for f in frames[1:]])
                exchange.value = _from_broker(exchange.request.finish(header, arrays, round_trip_ms, exchange.index), address)
            except Exception as exc:
                error = InternalError(f"could not decode the {exchange.request.op} reply from {address}: {exc}")
                error.__cause__ = exc
                exchange.error = error
        try:
            self._outbox.remove(exchange)
        except ValueError:
            pass

    def _fail(self, exchange: Exchange, failure: tuple[type[ServiceError], str, dict[str, Any]]) -> None:
        cls, message, details = failure
        exchange.done = True
        exchange.error = cls(message, details={**details, "attempts": exchange.attempts, "op": exchange.request.op})
        try:
            self._outbox.remove(exchange)
        except ValueError:
            pass

    def link_event(self, link: int, event: int, value: int, now: float) -> tuple[str | None, list[Exchange]]:
        """Take a monitor event of broker ``link``'s socket: (REOPEN or None, exchanges it settled).

        A connection that drops takes its replies with it (the broker routes
        each reply to the connection its request came on), so what went out on
        it is resent at once, spending a retry, and goes out to the broker
        chosen next (the same one when it is the only one, once it is back); a
        request with no retry left fails now rather than at its deadline. A
        refused handshake or a CurveZMQ mismatch fails, with a message that
        says what to change, everything pending when no other broker can take
        it, and otherwise only what was for that broker alone. Drivers read
        every waiting event before they send, so a request sent on a new
        connection is never taken for one lost with the old.
        """
        state = self.links[link]
        refused_before = state.failure is not None
        action = state.event(event, value, now)
        failed: list[Exchange] = []
        if state.failure is not None:
            everything = all(other.failure is not None for other in self.links)
            for exchange in self.pending():
                if everything or exchange.pin == link:
                    self._fail(exchange, state.failure)
                    failed.append(exchange)
            if not everything and not refused_before:
                log.warning("%s; using the other brokers meanwhile", state.failure[1])
        elif event == zmq.EVENT_DISCONNECTED:
            for exchange in self.pending():
                if exchange.via != link or exchange.unsent:
                    continue
                if exchange.retries_left > 0 and exchange.final > now:
                    exchange.retries_left -= 1
                    log.info("the connection to %s dropped while %s %s was out; resending it", state.address, exchange.request.op, exchange.id)
                    self._start_attempt(exchange, now)
                else:
                    self._fail(exchange, (
                        DeadlineExceeded,
                        f"the connection to {state.address} dropped while this request was out (the broker stopped, or "
                        f"the network failed) and no retry was left ({exchange.attempts} attempt(s)); raise retries=",
                        {"address": state.address, "reason": "connection_lost"},
                    ))  # fmt: skip
                    failed.append(exchange)
        return action, failed

    def _unreachable(self, exchange: Exchange, waited: float) -> tuple[type[ServiceError], str, dict[str, Any]]:
        if exchange.pin is not None:
            return self.links[exchange.pin].unreachable(waited)
        if not self.several:
            return self.links[0].unreachable(waited)
        each = "; ".join(f"{link.address}: {link.what_failed(waited)}" for link in self.links)
        return BrokerUnreachable, (
            f"cannot reach any of the {len(self.links)} brokers ({each}); check that a broker runs at each "
            f"(zdepth health --server {self.address}), the addresses and ports, and any firewall between"
        ), {"address": self.address, "addresses": list(self.addresses), "waited_s": waited, "reason": "unreachable"}

    def expire(self, now: float) -> list[Exchange]:
        """Settle what is past its deadline, and what found no connection for too long; returns what failed."""
        failed = []
        every = self._down_since()
        for exchange in self.pending():
            down = self._down_for(exchange, every)
            if down is not None:
                waited = now - max(down, exchange.opened)
                if waited >= self.unreachable_after:
                    self._fail(exchange, self._unreachable(exchange, waited))
                    failed.append(exchange)
                    continue
            if exchange.deadline > now:
                continue
            address = self.address if exchange.via is None else self.links[exchange.via].address
            if exchange.via is not None and exchange.pin is None and self.several and not exchange.unsent:
                link = self.links[exchange.via]
                if not link.silent and link.heard_at < (exchange.ids.get(exchange.id) or exchange.opened):
                    link.silent = True
                    log.warning(
                        "nothing heard from the broker at %s while %s %s waited %.3g s; sending to another broker",
                        address, exchange.request.op, exchange.id, now - (exchange.ids.get(exchange.id) or exchange.opened),
                    )  # fmt: skip
            if exchange.retries_left > 0 and exchange.final > now:
                exchange.retries_left -= 1
                log.info(
                    "no reply from %s to %s %s in %.3g s; retrying (attempt %d of %d)",
                    address, exchange.request.op, exchange.id, now - (exchange.ids.get(exchange.id) or exchange.opened),
                    exchange.attempts + 1, self.retries + 1,
                )  # fmt: skip
                self._start_attempt(exchange, now)
                continue
            waited = now - exchange.opened
            self._fail(exchange, (
                DeadlineExceeded,
                f"no reply from {address} after {waited:.1f} s ({exchange.attempts} attempt(s) of {self.timeout:g} s); "
                "check that the broker runs there (zdepth health) and the address, or raise timeout=",
                {"address": address, "waited_s": waited},
            ))  # fmt: skip
            failed.append(exchange)
        return failed


def _from_broker(value: Any, address: str) -> Any:
    """A result stamped with the broker that relayed it (health maps are left as they are)."""
    if isinstance(value, DepthResult):
        return dataclasses.replace(value, broker=address)
    if isinstance(value, PointCloudResult):
        return dataclasses.replace(value, depth=dataclasses.replace(value.depth, broker=address))
    return value


def brokers_health(exchanges: Sequence[Exchange], addresses: Sequence[str]) -> dict[str, Any]:
    """``{"brokers": [...]}`` from one settled health exchange per broker: each broker's health map, or the
    error that kept it from answering (its message and code)."""
    brokers: list[dict[str, Any]] = []
    for exchange, address in zip(exchanges, addresses):
        if isinstance(exchange.error, ServiceError):
            brokers.append({"address": address, "error": str(exchange.error), "code": exchange.error.code})
        else:
            brokers.append({"address": address, "health": exchange.result()})
    return {"brokers": brokers}


class StreamState:
    """In-order delivery for ``stream``: which requests are out, whether there is room, what is ready."""

    def __init__(self, pipeline: Pipeline, build: Callable[[Any], Request], max_in_flight: int, return_exceptions: bool) -> None:
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

