"""zdepth: Depth Anything V2 over ZeroMQ for a lab's cameras.

The public names below are loaded on first use (PEP 562): ``import zdepth.broker``
loads no client and no OpenCV, and nothing here imports torch, so the client runs
on robots without CUDA.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "AsyncClient": "zdepth.client.aio",
    "Client": "zdepth.client.sync",
    "DepthResult": "zdepth.client.results",
    "PointCloudResult": "zdepth.client.results",
    "Intrinsics": "zdepth.pointcloud",
    "depth_to_points": "zdepth.pointcloud",
    **{name: "zdepth.errors" for name in (
        "BadRequest", "ConfigError", "DeadlineExceeded", "InternalError", "Overloaded",
        "ServiceError", "Unauthorized", "UnknownModel", "WeightsNotFound", "WorkerLost", "ZdepthError",
    )},
}

__all__ = ["__version__", *_HOMES]

if TYPE_CHECKING:
    from zdepth.client.aio import AsyncClient
    from zdepth.client.results import DepthResult, PointCloudResult
    from zdepth.client.sync import Client
    from zdepth.errors import (
        BadRequest,
        ConfigError,
        DeadlineExceeded,
        InternalError,
        Overloaded,
        ServiceError,
        Unauthorized,
        UnknownModel,
        WeightsNotFound,
        WorkerLost,
        ZdepthError,
    )
    from zdepth.pointcloud import Intrinsics, depth_to_points


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'zdepth' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
