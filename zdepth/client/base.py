"""``ClientBase``: the options, lifecycle state, call building and socket flushing that Client and AsyncClient share.

The drivers differ only in how they wait and do socket I/O: ``Client``
(``sync``) polls, ``AsyncClient`` (``aio``) awaits; each supplies the few
socket methods ``_flush`` and ``_begin`` call. Imports no torch.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

from zdepth import models
from zdepth.client.calls import STREAM_OPS, WIRE_FORMATS, Call, coerce_intrinsics, model_id, prepare_image
from zdepth.client.exchanges import Exchange
from zdepth.client.options import (
    _DEFAULT_DATASET,
    DEFAULT_ADDRESS,
    DEFAULT_ENCODER,
    DEFAULT_TIMEOUT,
    ClientState,
    _Unchosen,
    resolve_addresses,
)
from zdepth.client.pipeline import Pipeline
from zdepth.client.replies import PointCloudFinisher, finish_depth, finish_health, ready_workers
from zdepth.client.urls import fetch_image, is_url
from zdepth.config import read_key
from zdepth.errors import DeadlineExceeded
from zdepth.pointcloud import Intrinsics
from zdepth.protocol import OP_HEALTH, OP_METRIC, OP_POINTCLOUD, OP_RELATIVE, compression
from zdepth.protocol.codec import DEPTH_CODECS, DEPTH_DTYPES, params_frame
from zdepth.protocol.curve import CurveClient

READY_POLL_S = 0.1  # wait_ready asks the broker again this often


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
        depth_codec: str = "none",
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
        if not isinstance(depth_codec, str) or depth_codec not in DEPTH_CODECS:
            raise ValueError(f"depth_codec must be one of {list(DEPTH_CODECS)}, got {depth_codec!r}")
        if depth_codec == compression.ZSTD:
            compression.require_zstd()  # ImportError naming the extra to install, now rather than at the first reply
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
        self.depth_codec = depth_codec
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

    # Building calls. A method's None falls back to the constructor's value, and then the server's.

    def _build_depth(
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
    ) -> Call:
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
            depth_codec=self.depth_codec,
        )
        model = model_id(op, encoder or self.encoder, dataset or self.dataset)
        return Call(op=op, model=model, body=(params, payload), finish=finish, created=created)

    def _build_relative(
        self, image: Any, *, encoder: str | None = None, input_size: int | None = None, created: float | None = None
    ) -> Call:
        return self._build_depth(OP_RELATIVE, image, encoder=encoder, input_size=input_size, created=created)

    def _build_metric(self, image: Any, **kwargs: Any) -> Call:
        return self._build_depth(OP_METRIC, image, **kwargs)

    def _build_pointcloud(
        self, image: Any, intrinsics: Any, *, colors: bool = True, on_server: bool = False, **kwargs: Any
    ) -> Call:
        intr = coerce_intrinsics(intrinsics)
        kwargs.setdefault("created", time.monotonic())
        if is_url(image):  # fetched once, for the request and for the colours
            image = fetch_image(image, timeout=self.timeout)
        finish = PointCloudFinisher(image=image, intrinsics=intr, colors=bool(colors), on_server=bool(on_server))
        if on_server:
            return self._build_depth(OP_POINTCLOUD, image, intrinsics=intr, finish=finish, **kwargs)
        return self._build_depth(OP_METRIC, image, finish=finish, **kwargs)

    def _build_health(self) -> Call:
        return Call(op=OP_HEALTH, model=None, body=(), finish=finish_health)

    def _stream_builder(self, op: str, max_in_flight: int, kwargs: dict[str, Any]) -> Callable[[Any], Call]:
        """Validate a stream's arguments up front; returns frame -> Call."""
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
            return lambda frame: self._build_pointcloud(frame, **kwargs)
        return lambda frame: self._build_depth(op, frame, **kwargs)

    # Driving the sockets: what Client and AsyncClient share. Each driver supplies the socket I/O:
    # _ensure_open, _open_socket, _close_socket_at, _read_replies, _read_monitors and _put.

    def _begin(self) -> None:
        """Before a new call: usable, connected, and a broker that refused the handshake tried afresh
        (ZeroMQ does not retry after a refusal; the pipeline says when)."""
        self._check_usable()
        self._ensure_open()
        for index in self._pipeline.refused(time.monotonic()):
            self._reopen(index)

    def _reopen(self, index: int) -> None:
        """Replace broker ``index``'s socket (with the security its link now asks for) and resend what was
        pending on it."""
        self._close_socket_at(index)
        self._open_socket(index)
        self._pipeline.requeue(index)

    def _flush(self) -> None:
        """Hand each attempt waiting to go out to the socket of the broker the pipeline routes it to, in order,
        until that socket would block. What came in is read first, so the pipeline knows which connections are
        up and which connection a request goes out on."""
        self._read_events()
        self._send_waiting()

    def _read_events(self) -> None:
        """Feed the pipeline every waiting reply, then every waiting connection event. Replies first: a reply
        waiting in the socket came in before the drop that follows it, so it counts, and the drop does not
        resend (or fail, with no retry left) a request that has its answer."""
        self._read_replies()
        self._read_monitors()

    def _expire(self) -> list[Exchange]:
        """Settle what is past its deadline now, having read first every reply and connection event that came in
        before now; returns what failed. A driver may get to its sockets late (a stream's consumer held a
        result, a coroutine blocked the loop, the host was busy): a reply that came in time still counts, and a
        connection that dropped in time is still a lost connection, not a timeout."""
        now = time.monotonic()
        self._read_events()
        return self._pipeline.expire(now)

    def _send_waiting(self) -> None:
        """``_flush`` without the reading: for a driver that has just read (``_expire``)."""
        blocked: set[int] = set()
        for exchange in self._pipeline.unsent():
            target = self._pipeline.route(exchange, time.monotonic())
            if target is None or target in blocked:
                continue
            self._send(exchange)
            if exchange.unsent:
                blocked.add(target)
                self._pipeline.send_blocked(time.monotonic(), target)

    def _send(self, exchange: Exchange) -> None:
        """Send the exchange's current attempt to the broker the pipeline routes it to; it stays unsent when there
        is none yet, or that socket would block (no connection yet, or a full queue)."""
        self._ensure_open()
        now = time.monotonic()
        target = self._pipeline.route(exchange, now)
        if target is None:
            return
        if self._put(target, self._pipeline.message(exchange, now)):
            self._pipeline.sent(exchange, now, target)

    def _put(self, target: int, frames: list[Any]) -> bool:
        """Give ``frames`` to broker ``target``'s socket without blocking; False when it would block (or has no socket)."""
        raise NotImplementedError

    def _ensure_open(self) -> None:
        raise NotImplementedError

    def _open_socket(self, index: int) -> None:
        raise NotImplementedError

    def _close_socket_at(self, index: int) -> None:
        raise NotImplementedError

    def _read_replies(self) -> None:
        raise NotImplementedError

    def _read_monitors(self) -> None:
        raise NotImplementedError

    # wait_ready, the parts that do not wait.

    def _ready_bound(self, timeout: float | None, workers: int) -> float:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        if timeout is None:
            timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < math.inf:
            raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        return time.monotonic() + timeout

    def _ready(self, health: dict[str, Any], model: str | None, workers: int) -> bool:
        return ready_workers(health, model) >= workers

    def _not_ready(self, last: Any, waited: float, model: str | None, workers: int) -> DeadlineExceeded:
        """The error wait_ready raises: the broker's own failure when it never answered, else what it answered."""
        wanted = f"{workers} worker(s) ready for {model or 'any model'}"
        if not isinstance(last, dict) and not any(link.up for link in self._pipeline.links):
            cls, message, details = self._pipeline.unreachable(waited)
            return cls(f"no {wanted}: {message}", details=details)
        if isinstance(last, DeadlineExceeded):  # BrokerUnreachable included: it keeps its class
            return type(last)(f"no {wanted} after {waited:.1f} s: {last.message}", details={**last.details, "waited_s": waited})
        health = last if isinstance(last, dict) else {}
        return DeadlineExceeded(
            f"no {wanted} at {self.address} after {waited:.1f} s: the broker answers, with {ready_workers(health, model)} ready "
            f"(serving {health.get('models') or 'no model'}); start a worker (zdepth worker --broker ...) or check its log",
            details={"address": self.address, "waited_s": waited, "reason": "not_ready"},
        )
