"""The zdepth wire protocol, version 1: constants, and building and parsing headers.

Every message is a ZeroMQ multipart message whose first frame is a small
msgpack map (the *header*, at most ``MAX_HEADER_BYTES``); further frames are
the *body*, which the broker forwards without reading. PROTOCOL.md is the
normative description; this module is its executable half.

Client (DEALER) <-> broker frontend (ROUTER)::

    request: [header{v, id, key, op, model?, timeout_ms?}, params(msgpack), image bytes]
    health:  [header{v, id, key, op="health"}]
    reply:   [header{v, id, status="ok", arrays=[{name, dtype, shape}], ...}, array bytes...]
    error:   [header{v, id, status=<error code>, message, details}]

Worker (DEALER) <-> broker backend (ROUTER)::

    worker -> broker  [{v, cmd="ready", key, models, capacity, info}]
                      [{v, cmd="heartbeat"}]
                      [{v, cmd="reply", rid, status}, client reply frames...]
                      [{v, cmd="disconnect", reason}]          (draining: no new work)
    broker -> worker  [{v, cmd="request", rid, id, op, model, timeout_ms, client}, body frames...]
                      [{v, cmd="heartbeat"}]
                      [{v, cmd="disconnect", reason}]          (re-announce, or stop if unauthorized)
"""

from __future__ import annotations

import hmac
import math
from typing import Any, NamedTuple

import msgpack

from zdepth.errors import BadRequest
from zdepth.models import MODEL_ID, is_metric_model

VERSION = 1

MAX_HEADER_BYTES = 4096
MAX_ID_CHARS = 64
MAX_MODEL_CHARS = 64
MAX_TIMEOUT_MS = 3_600_000

# Client ops.
OP_RELATIVE = "relative_depth"
OP_METRIC = "metric_depth"
OP_POINTCLOUD = "pointcloud"
OP_HEALTH = "health"
MODEL_OPS = frozenset({OP_RELATIVE, OP_METRIC, OP_POINTCLOUD})
OPS = MODEL_OPS | {OP_HEALTH}

# Worker <-> broker commands (after the ZeroMQ Guide's Majordomo pattern).
READY = "ready"
REQUEST = "request"
REPLY = "reply"
HEARTBEAT = "heartbeat"
DISCONNECT = "disconnect"
WORKER_COMMANDS = frozenset({READY, REPLY, HEARTBEAT, DISCONNECT})

STATUS_OK = "ok"
ERROR_CODES = ("unauthorized", "bad_request", "unknown_model", "overloaded", "timeout", "worker_lost", "internal")

# Why a broker tells a worker to go away.
REASON_UNAUTHORIZED = "unauthorized"
REASON_UNKNOWN_WORKER = "unknown_worker"
REASON_SHUTDOWN = "shutdown"


def pack(obj: Any) -> bytes:
    """msgpack with bin/str kept apart; never pickle."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack_map(frame: bytes | memoryview, *, what: str, limit: int | None = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Decode a msgpack map frame, refusing oversize frames and anything not a str-keyed map."""
    if limit is not None and len(frame) > limit:
        raise BadRequest(f"{what} is {len(frame)} bytes; the limit is {limit}")
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise BadRequest(f"{what} is not valid msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise BadRequest(f"{what} must be a msgpack map, got {type(obj).__name__}")
    return obj


def check_version(header: dict[str, Any], *, what: str) -> None:
    version = header.get("v")
    if version != VERSION:
        raise BadRequest(f"{what} has protocol version {version!r}; this server speaks version {VERSION}")


def keys_match(given: Any, expected: str | None) -> bool:
    """Constant-time key check; with no expected key every request passes."""
    if expected is None:
        return True
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def op_accepts_model(op: str, model_id: str) -> bool:
    """Relative depth needs a relative model; metric depth and point clouds need a metric one."""
    return is_metric_model(model_id) == (op != OP_RELATIVE)


class RequestHeader(NamedTuple):
    """What the broker reads of a client request: never the body (a tuple: read on every request)."""

    id: str
    key: Any
    op: str
    model: str | None
    timeout_ms: float | None


def request_header(
    *, id: str, key: str | None, op: str, model: str | None = None, timeout_ms: float | None = None
) -> bytes:
    header: dict[str, Any] = {"v": VERSION, "id": id, "key": key, "op": op}
    if model is not None:
        header["model"] = model
    if timeout_ms is not None:
        header["timeout_ms"] = timeout_ms
    return pack(header)


def peek_request_id(frame: bytes | memoryview) -> str | None:
    """Best-effort request id from a header that failed to parse, so the error can still be matched."""
    try:
        header = msgpack.unpackb(frame, raw=False) if len(frame) <= MAX_HEADER_BYTES else None
    except Exception:
        return None
    return header_id(header) if isinstance(header, dict) else None


def header_id(header: dict[str, Any]) -> str | None:
    """The header's ``id`` if it is a valid one, else None (the reply then carries a null id)."""
    request_id = header.get("id")
    return request_id if isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_CHARS else None


def read_request_map(frame: bytes | memoryview) -> dict[str, Any]:
    """The first step of reading a request: a str-keyed msgpack map of at most MAX_HEADER_BYTES.

    Only this may fail before the key is compared; every other rule is judged
    after it, so a peer without the key learns nothing of them.
    """
    return unpack_map(frame, what="request header")


def validate_request_header(header: dict[str, Any]) -> RequestHeader:
    """Judge a request header's fields (after its key was checked); raises BadRequest."""
    check_version(header, what="request header")
    request_id = header.get("id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_CHARS:
        raise BadRequest(f"request header field 'id' must be a string of 1 to {MAX_ID_CHARS} characters")
    op = header.get("op")
    if not isinstance(op, str) or op not in OPS:  # an unhashable op (a list, a map) must not raise TypeError
        raise BadRequest(f"unknown op {op!r}; expected one of {sorted(OPS)}")
    model = header.get("model")
    if op in MODEL_OPS and model is not None:
        if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_CHARS or not MODEL_ID.fullmatch(model):
            raise BadRequest(f"'model' must be a model id such as 'vits' or 'vitl-hypersim', got {model!r}")
    timeout_ms = header.get("timeout_ms")
    if timeout_ms is not None:
        if (
            isinstance(timeout_ms, bool)
            or not isinstance(timeout_ms, (int, float))
            or not math.isfinite(timeout_ms)
            or not 0 < timeout_ms <= MAX_TIMEOUT_MS
        ):
            raise BadRequest(f"'timeout_ms' must be a number in (0, {MAX_TIMEOUT_MS}], got {timeout_ms!r}")
    return RequestHeader(id=request_id, key=header.get("key"), op=op, model=model, timeout_ms=timeout_ms)


def parse_request_header(frame: bytes | memoryview) -> RequestHeader:
    """Read and validate a client header (no key check); raises BadRequest with a message a person can act on."""
    return validate_request_header(read_request_map(frame))


def reply_header(request_id: str | None, **fields: Any) -> bytes:
    """A successful reply header; ``fields`` carry arrays' descriptions, timings, model, worker."""
    return pack({"v": VERSION, "id": request_id, "status": STATUS_OK, **fields})


def error_header(request_id: str | None, code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    assert code in ERROR_CODES, code
    header: dict[str, Any] = {"v": VERSION, "id": request_id, "status": code, "message": message}
    if details:
        header["details"] = details
    return pack(header)


def command(cmd: str, **fields: Any) -> bytes:
    """A worker <-> broker header frame."""
    return pack({"v": VERSION, "cmd": cmd, **fields})


def parse_command(frame: bytes | memoryview) -> dict[str, Any]:
    """Validate a worker <-> broker header; raises BadRequest."""
    header = unpack_map(frame, what="worker message header")
    check_version(header, what="worker message header")
    if not isinstance(header.get("cmd"), str):
        raise BadRequest("worker message header needs a 'cmd' string")
    return header
