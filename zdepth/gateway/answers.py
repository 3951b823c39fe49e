"""What the gateway answers, in the old server's shapes: HTTP statuses for zdepth errors, JSON bodies with
base64 arrays (built without copying them), and the old health fields.
"""

import base64
import json
from typing import Any

import numpy as np

from zdepth.errors import (
    BadRequest,
    BrokerUnreachable,
    DeadlineExceeded,
    InternalError,
    Overloaded,
    ServiceError,
    Unauthorized,
    UnknownModel,
    WorkerLost,
)

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
