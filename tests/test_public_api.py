"""The public surface of ``import zdepth``: pinned, importable, and torch-free."""

from __future__ import annotations

import subprocess
import sys

import zdepth

PUBLIC = {
    "__version__",
    "Client",
    "AsyncClient",
    "DepthResult",
    "PointCloudResult",
    "Intrinsics",
    "depth_to_points",
    "ZdepthError",
    "ServiceError",
    "Unauthorized",
    "BadRequest",
    "UnknownModel",
    "Overloaded",
    "DeadlineExceeded",
    "WorkerLost",
    "InternalError",
    "WeightsNotFound",
    "ConfigError",
}


def test_all_is_pinned_and_every_name_exists():
    assert set(zdepth.__all__) == PUBLIC
    assert len(zdepth.__all__) == len(PUBLIC)
    for name in zdepth.__all__:
        assert getattr(zdepth, name) is not None


def test_every_wire_error_code_has_its_exception():
    from zdepth.errors import ERRORS_BY_CODE
    from zdepth.protocol import ERROR_CODES

    assert set(ERRORS_BY_CODE) == set(ERROR_CODES)
    for code, cls in ERRORS_BY_CODE.items():
        assert issubclass(cls, zdepth.ServiceError) and cls.code == code


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running one import statement."""
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True).stdout
    return set(out.split())


TORCH = {"torch", "torchvision", "depth_anything_v2"}


def test_the_client_and_the_broker_load_no_torch_and_no_worker():
    """The import graph points one way: client and broker use the wire, never the worker or the engine."""
    for statement in ("import zdepth", "import zdepth.broker", "import zdepth.client", "from zdepth import Client, AsyncClient"):
        loaded = loaded_after(statement)
        assert not loaded & TORCH, (statement, loaded & TORCH)
        assert not {m for m in loaded if m.split(".")[:2] in (["zdepth", "worker"], ["zdepth", "engine"], ["zdepth", "cli"], ["zdepth", "gateway"])}, statement
    broker = loaded_after("import zdepth.broker")
    assert "cv2" not in broker
    assert not {m for m in broker if m.split(".")[:2] == ["zdepth", "client"]}
    assert {m for m in loaded_after("import zdepth") if m.startswith("zdepth")} == {"zdepth"}


def test_the_command_line_and_the_wire_load_no_torch():
    loaded = loaded_after(
        "import zdepth.cli, zdepth.client.aio, zdepth.protocol.codec, zdepth.protocol.images, zdepth.pointcloud, zdepth.models,"
        " zdepth.engine.weights, zdepth.engine.batching, zdepth.worker"
    )
    assert not loaded & TORCH
    assert "zdepth.engine.inference" not in loaded
