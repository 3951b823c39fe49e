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


def test_client_and_broker_never_import_torch():
    code = (
        "import sys, zdepth, zdepth.client, zdepth.aio, zdepth.broker, zdepth.cli, zdepth.protocol, zdepth.codec;"
        "bad = [m for m in ('torch', 'torchvision', 'depth_anything_v2', 'zdepth.engine') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
