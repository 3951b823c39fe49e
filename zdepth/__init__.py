"""zdepth: Depth Anything V2 over ZeroMQ for a lab's cameras.

Importing zdepth never imports torch: the client runs on robots without CUDA.
"""

from .aio import AsyncClient
from .client import Client
from .errors import (
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
from .pointcloud import Intrinsics, depth_to_points
from .results import DepthResult, PointCloudResult

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "AsyncClient",
    "Client",
    "DepthResult",
    "PointCloudResult",
    "Intrinsics",
    "depth_to_points",
    "BadRequest",
    "ConfigError",
    "DeadlineExceeded",
    "InternalError",
    "Overloaded",
    "ServiceError",
    "Unauthorized",
    "UnknownModel",
    "WeightsNotFound",
    "WorkerLost",
    "ZdepthError",
]
