"""One exception tree for zdepth.

::

    ZdepthError
    ├── ServiceError               a request failed; carries a stable wire ``code``
    │   ├── Unauthorized           unauthorized   wrong or missing key
    │   ├── BadRequest             bad_request    malformed message, image or parameter
    │   ├── UnknownModel           unknown_model  no worker serves the model
    │   ├── Overloaded             overloaded     queue full; retry later or add workers
    │   ├── DeadlineExceeded       timeout        the deadline passed (server side or no reply)
    │   │   └── BrokerUnreachable  (client side)  no connection to the broker came up
    │   ├── WorkerLost             worker_lost    the worker died twice with the request
    │   └── InternalError          internal       a bug or a GPU fault; see the server log
    ├── WeightsNotFound            a checkpoint file is missing locally
    └── ConfigError                a bad profile file, option or environment variable

``ServiceError`` subclasses map one to one to the error codes of PROTOCOL.md
(``BrokerUnreachable`` is the client's own finding, never on the wire);
``error_from_code`` turns a reply's code back into the right class, so callers
can catch exactly what they can act on.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ZdepthError",
    "ServiceError",
    "Unauthorized",
    "BadRequest",
    "UnknownModel",
    "Overloaded",
    "DeadlineExceeded",
    "BrokerUnreachable",
    "WorkerLost",
    "InternalError",
    "WeightsNotFound",
    "ConfigError",
    "error_from_code",
]


class ZdepthError(Exception):
    """Base of every error zdepth raises on purpose."""


class ServiceError(ZdepthError):
    """A request failed; ``code`` is the stable machine-readable reason."""

    code = "internal"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class Unauthorized(ServiceError):
    code = "unauthorized"


class BadRequest(ServiceError, ValueError):
    code = "bad_request"


class UnknownModel(ServiceError, LookupError):
    code = "unknown_model"


class Overloaded(ServiceError):
    code = "overloaded"


class DeadlineExceeded(ServiceError, TimeoutError):
    code = "timeout"


class BrokerUnreachable(DeadlineExceeded, ConnectionError):
    """No working connection to the broker came up in time, so the request never reached it.

    A DeadlineExceeded, so code that
    handles "no reply in time" handles this too, only sooner; and a
    ConnectionError, as Python's own networking calls it.
    """

    code = "unreachable"


class WorkerLost(ServiceError):
    code = "worker_lost"


class InternalError(ServiceError):
    code = "internal"


class WeightsNotFound(ZdepthError, FileNotFoundError):
    """A checkpoint is not in the weights directory and was not downloaded."""


class ConfigError(ZdepthError, ValueError):
    """A profile file, option or environment variable is wrong."""


ERRORS_BY_CODE: dict[str, type[ServiceError]] = {
    cls.code: cls
    for cls in (Unauthorized, BadRequest, UnknownModel, Overloaded, DeadlineExceeded, WorkerLost, InternalError)
}


def error_from_code(code: str, message: str, details: dict[str, Any] | None = None) -> ServiceError:
    """The exception for a wire error code; an unknown code becomes InternalError."""
    cls = ERRORS_BY_CODE.get(code, InternalError)
    if cls is InternalError and code != "internal":
        message = f"[{code}] {message}"
    return cls(message, details=details)
