"""The old HTTP API in front of a broker: ``zdepth gateway --broker tcp://gpu-box:5555 --port 8000``.

Scripts written for the HTTP + JSON + base64 depth server keep working
unchanged: ``POST /pc``, ``/metric_depth`` and ``/rel_depth`` take the same
JSON fields and answer the same fields (float32 arrays as base64), ``GET
/health`` answers without a key, and ``Authorization: Bearer <key>`` is
checked (in constant time) before a request body is read. Every request is
forwarded through one ``zdepth.AsyncClient``; the gateway holds no model.

- The key: the gateway's bearer key is the broker key it uses (``--key-file``,
  ``ZDEPTH_KEY``, ``ZDEPTH_KEY_FILE``, or a profile's), so one secret serves
  both kinds of client. Without a key, anyone may call, as with the old server.
- ``/rel_depth`` keeps the old server's meaning: the METRIC model with
  ``max_depth`` 1 (``AsyncClient.legacy_relative_depth``), not the relative model.
- ``max_depth`` left out of ``/pc`` or ``/metric_depth`` is 1.0, as in the old
  server and its client; send 20 (hypersim) or 80 (vkitti) for metres.
- Images come as base64 of JPEG/PNG bytes (a ``data:`` URI too), or as an
  ``http(s)://`` URL in ``image`` (or ``image_url``). URLs are fetched only with
  ``--allow-url-fetch``: at most ``--url-max-bytes``, within ``--url-timeout``,
  following at most 5 redirects, and only to public addresses; every hop's
  host is resolved, checked, and connected to at the address that was checked
  (no second lookup a DNS answer could change). ``--allow-url-network CIDR``
  lets image hosts on a private network through (the lab's camera host; or
  127.0.0.0/8 to try the gateway on one machine).
- Errors keep FastAPI's ``{"detail": ...}`` body, plus the zdepth ``code``:
  401 unauthorized, 400 bad_request, 404 unknown_model (the model named by
  ``encoder`` and ``dataset`` is not served; ``served`` lists what is), 413 a
  body over the limit, 422 a body whose fields do not parse, 503 overloaded or
  worker_lost or no broker (with ``Retry-After``), 504 timeout, 500 internal.

FastAPI and uvicorn come with the ``gateway`` extra; importing this module
needs neither (the command imports them when it runs).
"""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import math
import signal
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from zdepth.client.urls import MAX_URL_IMAGE_BYTES, _shown_url
from zdepth.errors import (
    BadRequest,
    BrokerUnreachable,
    ConfigError,
    DeadlineExceeded,
    InternalError,
    Overloaded,
    ServiceError,
    Unauthorized,
    UnknownModel,
    WorkerLost,
)

__all__ = [
    "GatewaySettings",
    "UrlPolicy",
    "create_app",
    "fetch_url",
    "gateway_command",
    "http_status",
    "key_matches",
    "run_gateway",
    "token_matches",
]

log = logging.getLogger("zdepth.gateway")  # also when run as python -m zdepth.gateway

DEFAULT_BROKER = "tcp://localhost:5555"
DEFAULT_HOST = "0.0.0.0"  # the old server's default: the gateway is there to be reached from the lab
DEFAULT_PORT = 8000
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_URL_TIMEOUT_S = 10.0
MAX_URL_REDIRECTS = 5
LEGACY_MAX_DEPTH = 1.0  # the old server's max_depth when a request names none, and /rel_depth's always
LEGACY_ENCODER = "vitl"  # the old server's defaults for encoder, dataset and input size
LEGACY_DATASET = "hypersim"
LEGACY_INPUT_SIZE = 518
# The largest image a broker accepts, as base64 (4/3), plus room for the JSON around it.
MAX_BODY_BYTES = MAX_URL_IMAGE_BYTES * 4 // 3 + 1024 * 1024
HEALTH_TIMEOUT_S = 5.0
URL_CHUNK_BYTES = 1024 * 1024
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DEPTH_PATHS = ("/pc", "/metric_depth", "/rel_depth")
GATEWAY_EXTRA_HINT = 'pip install "zdepth[gateway]" (in a clone of the repository: pip install -e ".[gateway]")'


# ----------------------------------------------------------------------------- keys and errors


def key_digest(key: str) -> bytes:
    """What a bearer token is compared against: a SHA-256, so the comparison takes the same time whatever the lengths."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_matches(authorization: Optional[bytes], digest: bytes) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <the key>``, compared in constant time.

    Both sides are hashed first and compared with ``hmac.compare_digest``, so
    neither where a wrong key first differs nor its length shows in the time
    taken (the old server compared with ``!=``).
    """
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return token_matches(token.strip(), digest)


def token_matches(token: bytes, digest: bytes) -> bool:
    """Whether ``token`` is the key whose ``key_digest`` is ``digest``: hash, then ``hmac.compare_digest``."""
    return hmac.compare_digest(hashlib.sha256(token).digest(), digest)


# The first class an error is an instance of decides its status.
_STATUS_BY_ERROR: tuple[tuple[type[ServiceError], int], ...] = (
    (Unauthorized, 401),
    (BadRequest, 400),
    (UnknownModel, 404),
    (Overloaded, 503),
    (WorkerLost, 503),
    (BrokerUnreachable, 503),  # before DeadlineExceeded, its base: the broker is down, not slow
    (DeadlineExceeded, 504),
    (InternalError, 500),
)


def http_status(error: BaseException) -> int:
    """The HTTP status for a zdepth error (500 for anything unexpected)."""
    for cls, status in _STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return 500


def error_body(error: ServiceError) -> dict[str, Any]:
    """FastAPI's ``{"detail": ...}`` shape, plus the zdepth code and, for unknown_model, what is served."""
    body: dict[str, Any] = {"detail": error.message, "code": error.code}
    served = error.details.get("served") if isinstance(error.details, dict) else None
    if isinstance(served, list):
        body["served"] = [str(m) for m in served]
    return body


# ----------------------------------------------------------------------------- images: base64 or URL


def parse_image_field(text: str) -> "bytes | str":
    """The bytes of a base64 image (plain or a ``data:`` URI), or the URL itself for ``http(s)://``; BadRequest otherwise."""
    head = text[:16].lstrip().lower()
    if head.startswith(("http://", "https://")):
        return text.strip()
    if "://" in head:
        raise BadRequest(f"image URLs must be http:// or https://, got {_shown_url(text.strip())}")
    if head.startswith("data:"):
        meta, comma, text = text.partition(",")
        if not comma or ";base64" not in meta.lower():
            raise BadRequest("a data: URI image must be base64 (data:image/jpeg;base64,...)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # base64 wrapped in lines (base64.encodebytes, MIME) is still base64
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("image is neither base64 (of JPEG or PNG bytes) nor an http(s) URL") from None
    if not data:
        raise BadRequest("image is empty")
    return data


@dataclass(frozen=True)
class UrlPolicy:
    """When and how the gateway downloads an image given by URL.

    ``fetch``: off by default, since a gateway that fetches can be asked to
    reach anything it can reach. ``networks``: private networks whose hosts
    may be fetched all the same (any public address may). ``max_bytes`` and
    ``timeout_s`` bound each download, redirects included.
    """

    fetch: bool = False
    networks: tuple[Any, ...] = ()  # ipaddress.IPv4Network / IPv6Network
    max_bytes: int = MAX_URL_IMAGE_BYTES
    timeout_s: float = DEFAULT_URL_TIMEOUT_S
    max_redirects: int = MAX_URL_REDIRECTS

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ConfigError(f"the URL size limit must be at least 1 byte, got {self.max_bytes}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"the URL timeout must be a positive number of seconds, got {self.timeout_s}")

    @staticmethod
    def parse_networks(values: "list[str] | tuple[str, ...]") -> tuple[Any, ...]:
        """CIDR strings (``10.0.5.0/24``, ``127.0.0.1``, ``fd00::/8``) as networks; ConfigError for a bad one."""
        networks = []
        for value in values:
            for item in str(value).replace(",", " ").split():
                try:
                    networks.append(ipaddress.ip_network(item, strict=False))
                except ValueError as exc:
                    raise ConfigError(f"--allow-url-network: {exc}") from None
        return tuple(networks)

    def allows(self, address: Any) -> bool:
        """Whether a resolved address may be connected to: public, or inside one of ``networks``."""
        if any(address.version == net.version and address in net for net in self.networks):
            return True
        return is_public_address(address)


def is_public_address(address: Any) -> bool:
    """A globally routable unicast address: not private, loopback, link-local, multicast, reserved or unspecified
    (IPv4 inside IPv6, as ``::ffff:10.0.0.1``, 6to4 or Teredo, is judged by the IPv4 address it carries too)."""
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return is_public_address(address.ipv4_mapped)
        carried = [address.sixtofour, address.teredo[1] if address.teredo else None]
        if any(inner is not None and not is_public_address(inner) for inner in carried):
            return False
    return address.is_global and not address.is_multicast


def _allowed_addresses(host: str, port: int, policy: UrlPolicy, shown: str) -> list[tuple[int, Any]]:
    """(family, sockaddr) for every address of ``host`` the policy allows; BadRequest when there is none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise BadRequest(f"cannot fetch {shown}: cannot resolve {host}: {exc}", details={"url": shown}) from None
    allowed, refused = [], []
    for family, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        (allowed if policy.allows(address) else refused).append((family, sockaddr, address))
    if not allowed:
        where = refused[0][2] if refused else "nothing"
        raise BadRequest(
            f"cannot fetch {shown}: {host} is {where}, a private, loopback or link-local address, which this gateway does not "
            "fetch from (--allow-url-network lets a network through)",
            details={"url": shown},
        )
    return [(family, sockaddr) for family, sockaddr, _ in allowed]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to an address already checked: connects there, never looking the name up again."""

    def __init__(self, host: str, port: int, addresses: list, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def _open_socket(self) -> socket.socket:
        error: Optional[OSError] = None
        for family, sockaddr in self._addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error if error is not None else OSError("no address to connect to")

    def connect(self) -> None:
        self.sock = self._open_socket()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """HTTPS to an address already checked; the certificate is verified against the host name."""

    default_port = 443

    def __init__(self, host: str, port: int, addresses: list, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, addresses, timeout)
        self._context = context

    def connect(self) -> None:
        self.sock = self._context.wrap_socket(self._open_socket(), server_hostname=self.host)


_TLS_CONTEXT: Optional[ssl.SSLContext] = None


def _tls_context() -> ssl.SSLContext:
    global _TLS_CONTEXT
    if _TLS_CONTEXT is None:
        _TLS_CONTEXT = ssl.create_default_context()
    return _TLS_CONTEXT


def fetch_url(url: str, policy: UrlPolicy) -> bytes:
    """Download an image for a request, within ``policy``; BadRequest says why not.

    Blocking (the app runs it in a thread). Every hop, the first and each
    redirect, is resolved, checked against the policy and connected to at the
    checked address; proxies from the environment are not used. Messages never
    show a URL's query or credentials (signed URLs carry tokens there).
    """
    shown = _shown_url(url)
    if not policy.fetch:
        raise BadRequest(
            f"this gateway does not fetch image URLs ({shown}); send the image as base64, "
            "or start the gateway with --allow-url-fetch",
            details={"url": shown},
        )
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for _ in range(policy.max_redirects + 1):
        try:
            parts = urllib.parse.urlsplit(current)
            scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
        except ValueError as exc:
            raise BadRequest(f"cannot fetch {shown}: {exc}", details={"url": shown}) from None
        if scheme not in ("http", "https"):
            raise BadRequest(f"cannot fetch {shown}: it leads to {_shown_url(current)}, which is not http or https", details={"url": shown})
        if not host:
            raise BadRequest(f"cannot fetch {shown}: the URL names no host", details={"url": shown})
        port = port or (443 if scheme == "https" else 80)
        addresses = _allowed_addresses(host, port, policy, shown)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BadRequest(f"cannot fetch {shown}: no complete answer in {policy.timeout_s:g} s", details={"url": shown})
        if scheme == "https":
            conn: _PinnedHTTPConnection = _PinnedHTTPSConnection(host, port, addresses, remaining, _tls_context())
        else:
            conn = _PinnedHTTPConnection(host, port, addresses, remaining)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "zdepth-gateway"})
            response = conn.getresponse()
            if response.status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise BadRequest(f"cannot fetch {shown}: HTTP {response.status} without a Location", details={"url": shown})
                current = urllib.parse.urljoin(current, location.strip())
                continue
            if response.status != 200:
                raise BadRequest(
                    f"cannot fetch {shown}: HTTP {response.status} {response.reason}", details={"url": shown, "http_status": response.status}
                )
            return _read_image(conn, response, policy, deadline, shown)
        except socket.timeout:
            raise BadRequest(f"cannot fetch {shown}: no complete answer in {policy.timeout_s:g} s", details={"url": shown}) from None
        except (OSError, http.client.HTTPException) as exc:
            raise BadRequest(f"cannot fetch {shown}: {exc or type(exc).__name__}", details={"url": shown}) from None
        finally:
            conn.close()
    raise BadRequest(f"cannot fetch {shown}: more than {policy.max_redirects} redirects", details={"url": shown})


def _read_image(conn: http.client.HTTPConnection, response: http.client.HTTPResponse, policy: UrlPolicy, deadline: float, shown: str) -> bytes:
    kind = response.getheader("Content-Type", "") or ""
    if kind.startswith("text/"):
        raise BadRequest(f"cannot fetch {shown}: the server sent {kind.split(';')[0]}, not an image", details={"url": shown})
    too_big = f"cannot fetch {shown}: the image is larger than {policy.max_bytes} bytes, this gateway's limit"
    length = (response.getheader("Content-Length", "") or "").strip()
    if length.isdigit() and int(length) > policy.max_bytes:
        raise BadRequest(too_big, details={"url": shown})
    chunks, total = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout
        if conn.sock is not None:
            conn.sock.settimeout(remaining)
        chunk = response.read(min(URL_CHUNK_BYTES, policy.max_bytes + 1 - total))
        if not chunk:
            break
        total += len(chunk)
        if total > policy.max_bytes:
            raise BadRequest(too_big, details={"url": shown})
        chunks.append(chunk)
    if not total:
        raise BadRequest(f"cannot fetch {shown}: the server sent no bytes", details={"url": shown})
    return b"".join(chunks)


# ----------------------------------------------------------------------------- the app


@dataclass
class GatewaySettings:
    """What a gateway needs: the broker (an address, several comma-separated, or a profile name), its key and
    CurveZMQ pair, timeouts, the URL policy.

    ``key``: None reads ``ZDEPTH_KEY`` / ``ZDEPTH_KEY_FILE``, as ``zdepth.Client``
    does; the same key is then required as the bearer token. ``timeout`` and
    ``retries``: the AsyncClient's, so a request takes at most
    ``timeout * (retries + 1)`` seconds before it is answered 504.
    """

    broker: str = DEFAULT_BROKER
    key: Optional[str] = None
    curve: Any = None  # zdepth.curve.CurveClient
    timeout: float = DEFAULT_TIMEOUT_S
    retries: int = 1
    urls: UrlPolicy = field(default_factory=UrlPolicy)
    max_body_bytes: int = MAX_BODY_BYTES


def _blob(array: np.ndarray) -> bytes:
    """A float32 array as the old server sent it: base64 of its little-endian bytes in C order."""
    flat = np.ascontiguousarray(array, dtype="<f4").reshape(-1)
    return base64.b64encode(flat.view(np.uint8))


def json_parts(fields: list[tuple[str, Any]]) -> list[bytes]:
    """A JSON object from (name, value) pairs in order, as pieces to send one after another; ``bytes`` values
    are base64 text, put in as they are.

    Megabytes of base64 need no escaping: building the body around them, and
    sending the pieces without joining them, saves a generic encoder's scan
    and every copy of the arrays but the socket's own.
    """
    parts: list[bytes] = []
    small = b"{"
    for index, (name, value) in enumerate(fields):
        small += (b"," if index else b"") + json.dumps(name).encode() + b":"
        if isinstance(value, bytes):
            parts += [small + b'"', value]
            small = b'"'
        else:
            small += json.dumps(value).encode()
    parts.append(small + b"}")
    return parts


def json_bytes(fields: list[tuple[str, Any]]) -> bytes:
    """``json_parts`` as one body."""
    return b"".join(json_parts(fields))


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: tuple = ()) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data})


class _Guard:
    """ASGI middleware for the depth endpoints: the bearer key first, then the body read whole up to the limit.

    A caller without the key is answered 401 before a byte of its body is
    read, and nobody can make the gateway hold more than ``max_body`` bytes
    for one request.
    """

    def __init__(self, app: Any, *, digest: Optional[bytes], max_body: int, paths: tuple[str, ...]) -> None:
        self.app, self.digest, self.max_body, self.paths = app, digest, max_body, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self.digest is not None and not key_matches(headers.get(b"authorization"), self.digest):
            await _send_json(
                send, 401, {"detail": "missing or wrong API key: send Authorization: Bearer <key>", "code": "unauthorized"},
                ((b"www-authenticate", b"Bearer"),),
            )  # fmt: skip
            return
        too_big = {"detail": f"the request body is larger than {self.max_body} bytes", "code": "bad_request"}
        length = headers.get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > self.max_body:
            await _send_json(send, 413, too_big, ((b"connection", b"close"),))
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                await _send_json(send, 413, too_big, ((b"connection", b"close"),))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(settings: GatewaySettings) -> Any:
    """The ASGI app: the old server's four endpoints (and its ``/docs``), forwarding through an AsyncClient.

    The FastAPI app (``.app`` of what is returned) sits behind ``_Guard``,
    which checks the key and the body's size first. Needs the ``gateway`` extra.
    """
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPBearer
    from pydantic import BaseModel, Field, model_validator

    from zdepth import __version__
    from zdepth.client.aio import AsyncClient
    from zdepth.client.options import resolve_addresses
    from zdepth.config import read_key

    addresses, profile = resolve_addresses(settings.broker)  # one broker, several (a:5555,b:5555) or a profile
    # One key for both sides: the one the AsyncClient would use (given, else the profile's, else the environment's).
    key = settings.key or (profile.key if profile is not None and profile.key else None) or read_key()
    curve = settings.curve if settings.curve is not None else (profile.curve if profile is not None else None)
    client = AsyncClient(list(addresses), key=key, timeout=settings.timeout, retries=settings.retries, curve=curve)
    health_client = AsyncClient(list(addresses), key=key, timeout=min(settings.timeout, HEALTH_TIMEOUT_S), retries=0, curve=curve)
    counter = {"requests": 0}

    class CameraIntrinsics(BaseModel):
        fx: float
        fy: float
        cx: float
        cy: float

    class DepthRequest(BaseModel):
        """The old server's request: one model for all three endpoints."""

        image: Optional[str] = Field(None, description="base64 of JPEG/PNG bytes (or a data: URI), or an http(s) URL")
        image_url: Optional[str] = Field(None, description="an http(s) URL, instead of image")
        camera_intrinsics: Optional[CameraIntrinsics] = Field(None, description="pixels; required by /pc")
        max_depth: Optional[float] = Field(None, description="/pc and /metric_depth; default 1.0; /rel_depth always uses 1.0")
        encoder: str = LEGACY_ENCODER
        dataset: str = LEGACY_DATASET
        model_input_size: int = LEGACY_INPUT_SIZE

        @model_validator(mode="after")
        def _one_image(self):
            if not self.image and not self.image_url:
                raise ValueError("give the image: 'image' (base64 or an http(s) URL) or 'image_url'")
            return self

    class DepthResponse(BaseModel):
        depth_map: str = Field(description="base64 of float32 little-endian, row-major")
        shape: list[int]
        min: float
        max: float

    class PointCloudResponse(BaseModel):
        pointcloud: str = Field(description="base64 of float32 (N, 3): X = (u - cx) Z / fx, Y = (v - cy) Z / fy, Z = depth")
        pointcloud_shape: list[int]
        depth_map: str
        depth_shape: list[int]
        min: float
        max: float

    class HealthResponse(BaseModel):
        status: str
        device: Optional[str] = None
        worker_id: int = 0
        gpu_id: Optional[int] = None
        gpu_count: int = 0
        models_loaded: list[str] = []
        total_model_instances: int = 0
        request_counter: int = 0
        workers: int = 0

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        log.info(
            "gateway for broker %s: bearer key %s, URL fetching %s",
            client.address,
            "required" if key else "NOT required (no key: anyone may call)",
            ("on" + (f", also from {', '.join(map(str, settings.urls.networks))}" if settings.urls.networks else "")) if settings.urls.fetch else "off",
        )
        try:
            yield
        finally:
            await client.aclose()
            await health_client.aclose()

    app = FastAPI(
        title="zdepth gateway",
        version=__version__,
        description="The HTTP + JSON + base64 depth API, served through a zdepth broker.",
        lifespan=lifespan,
    )
    bearer = HTTPBearer(auto_error=False, description="The broker's key; checked before the body is read.")

    async def documented_key(_: Any = Depends(bearer)) -> None:
        """Declares the bearer key for /docs; the key itself is checked by _Guard before the body is read."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = http_status(exc)
        level = logging.ERROR if status in (401, 500) else logging.INFO
        log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, status, exc.code, exc.message)
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse(error_body(exc), status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s (traceback below)", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the gateway's log", "code": "internal"}, status_code=500)

    async def image_of(body: DepthRequest) -> bytes:
        image = parse_image_field(body.image) if body.image else body.image_url
        if isinstance(image, bytes):
            return image
        image = str(image)
        if not image.lower().startswith(("http://", "https://")):
            raise BadRequest(f"image_url must be an http:// or https:// URL, got {_shown_url(image)}")
        policy = settings.urls
        try:
            return await asyncio.wait_for(asyncio.to_thread(fetch_url, image, policy), policy.timeout_s + 1.0)
        except asyncio.TimeoutError:
            raise BadRequest(f"cannot fetch {_shown_url(image)}: no complete answer in {policy.timeout_s:g} s") from None

    def depth_fields(result: Any) -> list[tuple[str, Any]]:
        return [("depth_map", _blob(result.depth)), ("shape", list(result.depth.shape)), ("min", result.min), ("max", result.max)]

    def model_of(body: DepthRequest) -> dict[str, Any]:
        return {"encoder": body.encoder, "dataset": body.dataset, "input_size": body.model_input_size}

    class JsonParts(Response):
        """A JSON body sent as the pieces ``json_parts`` made, never joined into one copy."""

        media_type = "application/json"

        def __init__(self, parts: list[bytes]) -> None:
            super().__init__(b"")
            self.parts = parts
            self.headers["content-length"] = str(sum(len(part) for part in parts))

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for index, part in enumerate(self.parts):
                await send({"type": "http.response.body", "body": part, "more_body": index < len(self.parts) - 1})

    def answer(fields: list[tuple[str, Any]]) -> Response:
        return JsonParts(json_parts(fields))

    @app.post("/pc", responses={200: {"model": PointCloudResponse}}, dependencies=[Depends(documented_key)])
    async def pointcloud(body: DepthRequest) -> Response:
        """A point cloud (every pixel, camera frame) and the metric depth map it comes from."""
        counter["requests"] += 1
        if body.camera_intrinsics is None:
            raise BadRequest("/pc needs camera_intrinsics: {fx, fy, cx, cy} in pixels of this image")
        image = await image_of(body)
        k = body.camera_intrinsics
        max_depth = LEGACY_MAX_DEPTH if body.max_depth is None else body.max_depth
        result = await client.pointcloud(image, (k.fx, k.fy, k.cx, k.cy), max_depth=max_depth, colors=False, **model_of(body))
        depth = result.depth
        return answer(
            [
                ("pointcloud", _blob(result.points)),
                ("pointcloud_shape", list(result.points.shape)),
                ("depth_map", _blob(depth.depth)),
                ("depth_shape", list(depth.depth.shape)),
                ("min", depth.min),
                ("max", depth.max),
            ]
        )

    @app.post("/metric_depth", responses={200: {"model": DepthResponse}}, dependencies=[Depends(documented_key)])
    async def metric_depth(body: DepthRequest) -> Response:
        """Metric depth from the {encoder}-{dataset} model, scaled by max_depth (default 1.0, as the old server)."""
        counter["requests"] += 1
        image = await image_of(body)
        max_depth = LEGACY_MAX_DEPTH if body.max_depth is None else body.max_depth
        return answer(depth_fields(await client.metric_depth(image, max_depth=max_depth, **model_of(body))))

    @app.post("/rel_depth", responses={200: {"model": DepthResponse}}, dependencies=[Depends(documented_key)])
    async def rel_depth(body: DepthRequest) -> Response:
        """The old server's "relative" depth: the METRIC model with max_depth 1 (max_depth in the request is ignored)."""
        counter["requests"] += 1
        image = await image_of(body)
        return answer(depth_fields(await client.legacy_relative_depth(image, **model_of(body))))

    @app.get("/health", response_model=HealthResponse)
    async def health() -> JSONResponse:
        """The old server's health fields, from the broker's: 200 with workers, 503 without any or without the broker. No key."""
        try:
            info = await health_client.health()
        except ServiceError as exc:
            log.warning("health: the broker at %s did not answer: %s", health_client.address, exc)
            reason = "the broker refused the gateway's key" if isinstance(exc, Unauthorized) else "the broker does not answer"
            return JSONResponse({"status": "unhealthy", "detail": reason, "request_counter": counter["requests"]}, status_code=503)
        return JSONResponse(legacy_health(info, counter["requests"]), status_code=200 if info.get("workers") else 503)

    return _Guard(app, digest=key_digest(key) if key else None, max_body=settings.max_body_bytes, paths=DEPTH_PATHS)


def legacy_health(info: dict[str, Any], requests: int) -> dict[str, Any]:
    """The old server's health fields from a broker's health map.

    ``device`` and ``gpu_id``: the first worker's; ``gpu_count``: the CUDA
    devices serving (each host's counted apart); ``models_loaded``: the model
    ids the broker serves (``vitl-hypersim``); ``total_model_instances``:
    models summed over workers; ``request_counter``: depth requests this
    gateway has received; ``workers``: how many are connected.
    """
    workers = [w for w in info.get("workers") or [] if isinstance(w, dict)]
    devices = [str(w.get("device") or "") for w in workers]
    cuda = sorted({(str(w.get("host")), str(w.get("device"))) for w in workers if str(w.get("device") or "").startswith("cuda")})
    gpu_id = None
    if devices and devices[0].startswith("cuda"):
        index = devices[0].partition(":")[2]
        gpu_id = int(index) if index.isdigit() else 0
    return {
        "status": "healthy" if workers else "unhealthy",
        "device": devices[0] if devices else None,
        "worker_id": 0,
        "gpu_id": gpu_id,
        "gpu_count": len(cuda),
        "models_loaded": sorted(str(m) for m in info.get("models") or []),
        "total_model_instances": sum(len(w.get("models") or []) for w in workers),
        "request_counter": requests,
        "workers": len(workers),
    }


# ----------------------------------------------------------------------------- running it


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a port in use is reported as such (exit 4)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def run_gateway(
    broker: str = DEFAULT_BROKER,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    key: Optional[str] = None,
    curve: Any = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    retries: int = 1,
    urls: Optional[UrlPolicy] = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    log_level: str = "info",
    access_log: bool = True,
    sock: Optional[socket.socket] = None,
) -> None:
    """Serve the old HTTP API on ``host:port`` (or on ``sock``, already listening) in front of ``broker``
    until SIGINT or SIGTERM.

    Raises OSError when the address cannot be bound and ModuleNotFoundError
    without the ``gateway`` extra.
    """
    import uvicorn

    settings = GatewaySettings(broker=broker, key=key, curve=curve, timeout=timeout, retries=retries, urls=urls or UrlPolicy(), max_body_bytes=max_body_bytes)
    app = create_app(settings)
    if sock is None:
        sock = _bind(host, port)
    bound = sock.getsockname()
    shown_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    log.info("zdepth gateway listening on http://%s:%d (API docs at /docs)", shown_host, bound[1])
    config = uvicorn.Config(app, log_config=None, log_level=log_level.lower(), access_log=access_log, loop="asyncio", lifespan="on")
    stopped = []
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler it found;
    # with ours in place a requested stop ends the command with status 0, like every other zdepth server.
    previous = {sig: signal.signal(sig, lambda signum, _frame: stopped.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)} if threading.current_thread() is threading.main_thread() else {}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        log.info("gateway stopped (%s)", signal.Signals(stopped[0]).name)


# ----------------------------------------------------------------------------- the command

GatewayBroker = Annotated[
    str,
    typer.Option(
        "--server",
        "--broker",
        envvar="ZDEPTH_SERVER",
        help="The broker's client endpoint (tcp://HOST:5555, HOST:5555) or a profile name, as for predict and health.",
    ),
]


def gateway_command(
    ctx: typer.Context,
    broker: GatewayBroker = DEFAULT_BROKER,
    host: Annotated[str, typer.Option("--host", envvar="ZDEPTH_HOST", help="Address to listen on (0.0.0.0: every interface).")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", envvar="ZDEPTH_PORT", min=0, max=65535, help="HTTP port (0: any free one, logged).")] = DEFAULT_PORT,
    key: Annotated[
        Optional[str],
        typer.Option("--key", envvar="ZDEPTH_KEY", help="The broker's key, also the bearer key HTTP callers send. Prefer ZDEPTH_KEY or --key-file: `ps` shows command lines.", show_default=False),
    ] = None,
    key_file: Annotated[Optional[Path], typer.Option("--key-file", envvar="ZDEPTH_KEY_FILE", help="File holding the shared secret.", show_default=False)] = None,
    curve_secret: Annotated[
        Optional[Path],
        typer.Option("--curve-secret", envvar="ZDEPTH_CURVE_SECRET", help="CurveZMQ: this machine's NAME.key_secret, for a broker that encrypts. Needs --curve-server-key.", show_default=False),
    ] = None,
    curve_server_key: Annotated[
        Optional[Path],
        typer.Option("--curve-server-key", envvar="ZDEPTH_CURVE_SERVER_KEY", help="CurveZMQ: the broker's public NAME.key. Needs --curve-secret.", show_default=False),
    ] = None,
    timeout: Annotated[
        Optional[float],
        typer.Option("--timeout", envvar="ZDEPTH_TIMEOUT", min=0.001, help="Seconds per attempt at the broker. Default: the profile's, else 30.", show_default=False),
    ] = None,
    retries: Annotated[int, typer.Option("--retries", envvar="ZDEPTH_RETRIES", min=0, help="Resends of a request whose attempt got no reply.")] = 1,
    allow_url_fetch: Annotated[
        bool,
        typer.Option("--allow-url-fetch/--no-allow-url-fetch", envvar="ZDEPTH_ALLOW_URL_FETCH", help="Download images given by http(s) URL (public addresses only)."),
    ] = False,
    allow_url_network: Annotated[
        Optional[list[str]],
        typer.Option(
            "--allow-url-network",
            envvar="ZDEPTH_ALLOW_URL_NETWORK",
            help="With --allow-url-fetch: a private network (CIDR) whose hosts may be fetched from too, e.g. the lab's camera host 10.0.5.0/24, "
            "or 127.0.0.0/8 to try it on one machine. Repeatable.",
            show_default=False,
        ),
    ] = None,
    url_max_bytes: Annotated[int, typer.Option("--url-max-bytes", envvar="ZDEPTH_URL_MAX_BYTES", min=1, help="Largest image downloaded by URL.")] = MAX_URL_IMAGE_BYTES,
    url_timeout: Annotated[float, typer.Option("--url-timeout", envvar="ZDEPTH_URL_TIMEOUT", min=0.001, help="Seconds for one download, redirects included.")] = DEFAULT_URL_TIMEOUT_S,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", envvar="ZDEPTH_ACCESS_LOG", help="A log line per HTTP request (at info).")] = True,
    log_level: Annotated[
        Optional[str],
        typer.Option("--log-level", envvar="ZDEPTH_LOG_LEVEL", help="How much to log (to stderr): debug, info, warning, error. Default: info.", show_default=False),
    ] = None,
) -> None:
    """Serve the old HTTP depth API (/pc, /metric_depth, /rel_depth, /health; Bearer key) in front of a broker."""
    from zdepth.cli import _errors, _resolve_target, setup_logging
    from zdepth.supervisor import EXIT_ADDRESS, EXIT_MISSING

    setup_logging(log_level)
    level = (log_level or "info").lower()
    with _errors():
        try:
            target = _resolve_target(ctx, broker, key=key, key_file=key_file, curve_secret=curve_secret, curve_server_key=curve_server_key, timeout=timeout)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("--server", "--broker")) from None
        networks = UrlPolicy.parse_networks(allow_url_network or [])
        if networks and not allow_url_fetch:
            raise ConfigError("--allow-url-network only matters with --allow-url-fetch")
        urls = UrlPolicy(fetch=allow_url_fetch, networks=networks, max_bytes=url_max_bytes, timeout_s=url_timeout)
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ModuleNotFoundError as exc:
            typer.echo(f"error: the gateway needs {exc.name}, which is not installed: {GATEWAY_EXTRA_HINT}", err=True)
            raise typer.Exit(EXIT_MISSING) from None
        try:
            sock = _bind(host, port)
        except OSError as exc:
            typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc} (--host, --port)", err=True)
            raise typer.Exit(EXIT_ADDRESS) from None
        run_gateway(
            target.address,
            key=target.key,
            curve=target.curve,
            timeout=target.timeout or DEFAULT_TIMEOUT_S,
            retries=retries,
            urls=urls,
            log_level=level,
            access_log=access_log,
            sock=sock,
        )


def _main() -> None:
    """``python -m zdepth.gateway``: the same command as ``zdepth gateway``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})
    app.command()(gateway_command)
    app(prog_name="zdepth gateway")


if __name__ == "__main__":
    _main()
