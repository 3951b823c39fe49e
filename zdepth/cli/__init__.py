"""The ``zdepth`` command: broker, worker, serve, predict, health and bench.

Thin on purpose: options (and their ``ZDEPTH_*`` environment variables) become
the config dataclasses, then a library call does the work. Logging is
configured here and nowhere else. Importing this module imports no torch (nor
the broker, worker or client): each command imports what it needs when it runs,
and the in-process ``predict`` path imports the engine only then.

Keys never need to be on a command line, where ``ps`` shows them: every
command reads ``ZDEPTH_KEY``, or the file named by ``--key-file`` or
``ZDEPTH_KEY_FILE``. ``--key`` exists for quick tests.

CurveZMQ (``zdepth.curve``) is optional: ``zdepth keygen NAME`` writes a
certificate pair; the broker takes ``--curve-secret`` and ``--curve-allow``,
workers and client commands ``--curve-secret`` and ``--curve-server-key``.
Only file paths travel on command lines, never key material.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from zdepth import __version__
from zdepth.config import CLIENT_REPLY_HWM, MAX_CLIENT_BYTES, MAX_QUEUE_BYTES
from zdepth.models import DEFAULT_INPUT_SIZE, input_size_problem, split_model_id
from zdepth.errors import ConfigError, ZdepthError
from zdepth.signals import on_stop_signals
from zdepth.supervisor import EXIT_ADDRESS, EXIT_INTERRUPTED, EXIT_MISSING, report_ready

__all__ = ["app", "default_curve_dir", "main", "resolve_server", "setup_logging"]

logger = logging.getLogger("zdepth.cli")

DEFAULT_SERVER = "tcp://localhost:5555"
ENV_PREFIX = "ZDEPTH_"  # every option OPT also comes from ZDEPTH_OPT (dashes as underscores)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PRECISIONS = ("fp32", "fp16", "bf16")
MODELS_HELP = (
    "Model id: vits, vitb, vitl (relative depth) or vits-hypersim, vitb-hypersim, vitl-hypersim, vits-vkitti, vitb-vkitti, "
    "vitl-vkitti (metric, metres). vits is Apache-2.0; vitb and vitl are CC-BY-NC-4.0 (non-commercial use only)."
)
DEVICE_METAVAR = "<auto|cpu|cuda:N>"


class LogLevelName(str, enum.Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"
    critical = "critical"


class PrecisionName(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class WireFormat(str, enum.Enum):
    raw = "raw"
    jpeg = "jpeg"


# cv2's colour maps (cv2.COLORMAP_*), for --colormap.
Colormap = enum.Enum("Colormap", {m: m for m in (
    "autumn", "bone", "jet", "winter", "rainbow", "ocean", "summer", "spring", "cool", "hsv", "pink", "hot", "parula",
    "magma", "inferno", "plasma", "viridis", "cividis", "twilight", "twilight_shifted", "turbo", "deepgreen",
)}, type=str)  # fmt: skip


def _value(choice: Any) -> Any:
    """An enum option's plain value (None stays None)."""
    return choice.value if isinstance(choice, enum.Enum) else choice


class _PlainFlags:
    """Flags show no value placeholder in --help (they take none); mixed into the command and group classes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_PlainFlags, typer.core.TyperCommand):
    """A command whose flags show no value placeholder."""


class _Group(_PlainFlags, typer.core.TyperGroup):
    """The top-level command, flags likewise."""


app = typer.Typer(
    name="zdepth",
    cls=_Group,
    help="Depth Anything V2 over ZeroMQ: a broker, one worker per GPU, and clients.\n\n"
    "On a GPU box: `zdepth serve`. Anywhere: `zdepth predict photos/ --out depth/`, `zdepth health`.\n\n"
    "Every option also comes from an environment variable: ZDEPTH_ and its name, dashes as underscores "
    "(--weights-dir: ZDEPTH_WEIGHTS_DIR); the command line wins. For predict, health and bench, a profile "
    "named by --server beats the environment. Exit status: 0 done, 1 failed, 2 bad option or setting, "
    "3 checkpoint or torch missing, 4 address cannot be bound.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
command = functools.partial(app.command, cls=_Command)


# ----------------------------------------------------------------------------- shared options

LogLevel = Annotated[
    LogLevelName | None,
    typer.Option("--log-level", envvar="ZDEPTH_LOG_LEVEL", case_sensitive=False, help="How much to log (to stderr). Default: info.", show_default=False),
]
Key = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="ZDEPTH_KEY",
        help="The shared secret. Prefer the environment variable or --key-file: a key on the command line shows in `ps`.",
        show_default=False,
    ),
]
KeyFile = Annotated[
    Path | None,
    typer.Option("--key-file", envvar="ZDEPTH_KEY_FILE", help="File holding the shared secret.", show_default=False),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        envvar="ZDEPTH_METRICS_PORT",
        min=0,
        max=65535,
        help="Serve Prometheus metrics at http://*:PORT/metrics (needs the metrics extra). Default: off.",
        show_default=False,
    ),
]
MaxBatch = Annotated[
    int | None,
    typer.Option("--max-batch", envvar="ZDEPTH_MAX_BATCH", min=1, help="Largest batch per forward pass. Default: 8 on CUDA; on a CPU, chosen from its cores.", show_default=False),
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", envvar="ZDEPTH_THREADS", min=1, help="torch threads of a CPU worker. Default: chosen from the cores (OMP_NUM_THREADS wins).", show_default=False),
]
Pipeline = Annotated[
    bool,
    typer.Option("--pipeline/--no-pipeline", envvar="ZDEPTH_PIPELINE", help="Prepare the next batch and reply to the last while one runs (off: one step at a time)."),
]
MaxPixels = Annotated[
    int | None,
    typer.Option("--max-pixels", envvar="ZDEPTH_MAX_PIXELS", min=1, help="Pixels per image. Default: the most whose float32 depth map fits one reply (4096x4096).", show_default=False),
]
Precision = Annotated[
    PrecisionName | None,
    typer.Option("--precision", envvar="ZDEPTH_PRECISION", help="Default (auto): fp16 on CUDA, fp32 on CPU.", show_default=False),
]
MaxWaitMs = Annotated[
    float,
    typer.Option(
        "--max-wait-ms",
        envvar="ZDEPTH_MAX_WAIT_MS",
        min=0,
        help="Milliseconds a partial batch waits for more requests. At 0, requests that arrive while a batch runs form the next one, and a lone request never waits.",
    ),
]
CudaGraphs = Annotated[
    bool | None,
    typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        envvar="ZDEPTH_CUDA_GRAPHS",
        help="Replay each forward pass as a CUDA graph (default: on for CUDA devices): far less launch overhead "
        "at small batches; captured per padded batch size during the warm-up, and holds that memory.",
        show_default=False,
    ),
]
GpuDecode = Annotated[
    bool,
    typer.Option(
        "--gpu-decode/--no-gpu-decode",
        envvar="ZDEPTH_GPU_DECODE",
        help="Decode JPEG frames on the GPU with nvjpeg (CUDA only): ~2 ms less CPU per frame, but its chroma "
        "upsampling differs from cv2's, which moves depth by ~1e-2 relative L2. Off: cv2 decodes, as the reference does.",
    ),
]
Heartbeat = Annotated[float, typer.Option("--heartbeat", envvar="ZDEPTH_HEARTBEAT", min=0.01, help="Seconds between heartbeats.")]
Liveness = Annotated[
    int, typer.Option("--liveness", envvar="ZDEPTH_LIVENESS", min=1, help="Missed heartbeats before a peer counts as dead.")
]
Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        "-s",
        envvar="ZDEPTH_SERVER",
        help="Broker address (tcp://host:5555, or host:port), several as a:5555,b:5555 (the client fails over), or a profile name from the profiles file (ZDEPTH_CONFIG).",
        show_default=False,
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", envvar="ZDEPTH_JSON", help="Print JSON for scripts instead of text.")]
BrokerCurveSecret = Annotated[
    Path | None,
    typer.Option(
        "--curve-secret",
        envvar="ZDEPTH_CURVE_SECRET",
        help="CurveZMQ: the broker's secret certificate (NAME.key_secret from `zdepth keygen`). Encrypts every client and worker "
        "connection; clients and workers then need the broker's public NAME.key (--curve-server-key).",
        show_default=False,
    ),
]
CurveAllow = Annotated[
    Path | None,
    typer.Option(
        "--curve-allow",
        envvar="ZDEPTH_CURVE_ALLOW",
        help="CurveZMQ: folder of the public certificates (NAME.key) of the clients and workers allowed to connect; read at start, "
        "so restart the broker after adding one. Needs --curve-secret. Omitted: encryption without an allow-list "
        "(any peer that knows the broker's public key connects).",
        show_default=False,
    ),
]
WorkerCurveSecret = Annotated[
    Path | None,
    typer.Option(
        "--curve-secret",
        envvar="ZDEPTH_CURVE_SECRET",
        help="CurveZMQ: this worker's secret certificate (NAME.key_secret from `zdepth keygen`; its NAME.key must be in the "
        "broker's --curve-allow folder). Needs --curve-server-key.",
        show_default=False,
    ),
]
WorkerCurveServerKey = Annotated[
    Path | None,
    typer.Option(
        "--curve-server-key",
        envvar="ZDEPTH_CURVE_SERVER_KEY",
        help="CurveZMQ: the broker's public certificate (its NAME.key). Needs --curve-secret.",
        show_default=False,
    ),
]
# CurveZMQ for client commands: the command line beats the profile's setting, which beats the environment.
ClientCurveSecret = Annotated[
    Path | None,
    typer.Option(
        "--curve-secret",
        envvar="ZDEPTH_CURVE_SECRET",
        help="CurveZMQ: this machine's secret certificate (NAME.key_secret from `zdepth keygen`), for a broker that encrypts. "
        "Needs --curve-server-key too. Default: the profile's curve_secret.",
        show_default=False,
    ),
]
ClientCurveServerKey = Annotated[
    Path | None,
    typer.Option(
        "--curve-server-key",
        envvar="ZDEPTH_CURVE_SERVER_KEY",
        help="CurveZMQ: the broker's public certificate (its NAME.key). Needs --curve-secret too. Default: the profile's curve_server_key.",
        show_default=False,
    ),
]
CURVE_ENVS = ("ZDEPTH_CURVE_SECRET", "ZDEPTH_CURVE_ALLOW", "ZDEPTH_CURVE_SERVER_KEY", "ZDEPTH_CURVE_WORKER_SECRET")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_global_log_level: str | None = None


def setup_logging(level: Any, default: str = "info") -> None:
    """One stderr handler on the root logger (replacing ours from an earlier call), ``zdepth.*`` at ``level``."""
    name = str(_value(level) or _value(_global_log_level) or default).lower()
    if name not in LOG_LEVELS:
        raise typer.BadParameter(f"{level!r} is not one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    logging.getLogger("zdepth").setLevel(name.upper())


TORCH_HINT = 'pip install "zdepth[worker]" (in a clone of the repository: pip install -e ".[worker]")'


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Our errors as one readable line and an exit status that says whether trying again can help.

    2 for bad settings, 3 for a missing checkpoint or torch, 1 for other failures
    (see zdepth.supervisor: ``serve`` restarts a child only after the last kind).
    """
    from zdepth.errors import WeightsNotFound
    from zdepth.supervisor import EXIT_CONFIG, EXIT_FAILURE

    try:
        yield
    except ConfigError as exc:
        typer.echo(f"error: {_cli_words(str(exc))}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except WeightsNotFound as exc:
        typer.echo(f"error: {_cli_words(str(exc))}", err=True)
        raise typer.Exit(EXIT_MISSING) from None
    except ZdepthError as exc:
        typer.echo(f"error: {_cli_words(str(exc))}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    except ValueError as exc:  # the engine's refusals of settings (a CUDA device without CUDA, fp16 on the CPU, ...)
        logger.debug("details", exc_info=True)
        typer.echo(f"error: {_cli_words(str(exc))}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("torch", "torchvision"):
            raise
        typer.echo(f"error: {_missing_torch(exc.name)}", err=True)
        raise typer.Exit(EXIT_MISSING) from None


def _missing_torch(name: str | None = "torch") -> str:
    return f"running the model needs {name or 'torch'}, which is not installed: {TORCH_HINT}"


# Library messages name Python arguments; on the command line the options are what a user can change.
_API_ARGUMENTS = ("timeout", "retries", "key_file", "key", "device", "precision", "download", "max_depth", "input_size", "weights_dir", "intrinsics")
_API_ARGUMENT = re.compile(
    rf"(?<![\w.-])({'|'.join(_API_ARGUMENTS)})=(?:'([^']*)'|\"([^\"]*)\"|(True)\b|(?=[\s,.;)]|$))"
)


def _cli_words(message: str) -> str:
    """``message`` as the CLI says it: ``timeout=`` becomes ``--timeout``, ``device='cpu'`` ``--device cpu``;
    asides meant for Python callers only (``(... in Python)``) are dropped."""
    message = re.sub(r"\s*\([^()]*\bin Python\)", "", message)

    def option(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2) if match.group(2) is not None else match.group(3)
        flag = "--" + name.replace("_", "-")
        return f"{flag} {value}" if value else flag

    return _API_ARGUMENT.sub(option, message)


def _resolve_key(key: str | None, key_file: Path | None, profile_key: str | None = None) -> str | None:
    """--key, else --key-file, else the profile's key, else ZDEPTH_KEY / ZDEPTH_KEY_FILE."""
    from zdepth.config import read_key

    if key or key_file:
        return read_key(key, key_file)
    return profile_key or read_key()


def _address(value: str, option: str, *, bind: bool = False) -> str:
    """An address option as a ZeroMQ endpoint; ConfigError (exit 2) naming the option and the accepted forms."""
    from zdepth.profiles import normalize_address

    try:
        return normalize_address(value, bind=bind)
    except ConfigError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def resolve_server(server: str | None, key: str | None = None, key_file: Path | None = None) -> tuple[str, str | None, str | None]:
    """(address, key, default model) for ``--server``: an address (``tcp://host:5555``, ``host:5555``, ...) or a profile name.

    The profile's key is used unless ``--key``/``--key-file`` say otherwise.
    """
    target = _resolve_target(None, server, key=key, key_file=key_file)
    return target.address, target.key, target.model


@dataclass(frozen=True)
class _Target:
    """Where a client command goes: the address, key, default model, timeout and CurveZMQ settings."""

    address: str
    key: str | None
    model: str | None
    timeout: float | None
    curve: Any  # zdepth.curve.CurveClient | None


def _from_environment(ctx: Any, name: str) -> bool:
    """Whether option ``name`` got its value from its ZDEPTH_* variable (rather than the command line or its default)."""
    if ctx is None:
        return False
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) == "ENVIRONMENT"


def _resolve_target(
    ctx: Any,
    server: str | None,
    *,
    key: str | None = None,
    key_file: Path | None = None,
    curve_secret: Path | None = None,
    curve_server_key: Path | None = None,
    timeout: float | None = None,
    model: str | None = None,
) -> _Target:
    """``--server`` (an address or a profile) with the key, model, timeout and CurveZMQ certificates that go with it.

    Each setting: the command line's, else the profile's, else the environment's (``ctx`` tells them apart),
    so that ``--server lab`` uses lab's key even where ZDEPTH_KEY holds another broker's.
    """
    from zdepth.config import read_key
    from zdepth.profiles import resolve_server as resolve

    try:
        address, profile = resolve(server if server is not None else DEFAULT_SERVER)
    except ConfigError as exc:
        raise ConfigError(f"--server: {exc}") from None

    def pick(name: str, value: Any, from_profile: Any) -> Any:
        if value is not None and not _from_environment(ctx, name):
            return value
        return from_profile if from_profile is not None else value

    typed = {name: value for name, value in (("key", key), ("key_file", key_file)) if value and not _from_environment(ctx, name)}
    if typed:
        secret = read_key(typed.get("key"), typed.get("key_file"))
    elif profile is not None and profile.key:
        secret = profile.key
    else:
        secret = read_key(key, key_file) if key or key_file else read_key()
    curve = _curve_pair(
        pick("curve_secret", curve_secret, profile.curve_secret if profile else None),
        pick("curve_server_key", curve_server_key, profile.curve_server_key if profile else None),
    )
    return _Target(
        address,
        secret,
        pick("model", model, profile.model if profile else None),
        pick("timeout", timeout, profile.timeout if profile else None),
        curve,
    )


def _curve_pair(secret: Path | None, server_key: Path | None):
    """A CurveClient for a worker or client, None without either file; ConfigError (exit 2) for half a pair."""
    if secret is None and server_key is None:
        return None
    if secret is None or server_key is None:
        raise ConfigError(
            "CurveZMQ needs both --curve-secret (this machine's NAME.key_secret) and --curve-server-key (the broker's public NAME.key); "
            f"got only {'--curve-secret' if secret is not None else '--curve-server-key'}"
        )
    from zdepth.protocol.curve import CurveClient

    curve = CurveClient(secret.expanduser(), server_key.expanduser())
    _check_certificates(curve)
    return curve


def _check_certificates(curve: Any) -> None:
    """Read CurveZMQ certificates now (ConfigError naming the file), on a throwaway socket."""
    import zmq

    from zdepth.protocol.curve import CurveServer, apply_client, apply_server

    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as probe:
        probe.linger = 0
        if isinstance(curve, CurveServer):
            apply_server(probe, curve)
        else:
            apply_client(probe, curve)


def _curve_server(secret: Path | None, allow: Path | None):
    """The broker's CurveZMQ settings, or None; ConfigError (exit 2) for an allow folder without a certificate."""
    if secret is None:
        if allow is not None:
            raise ConfigError("--curve-allow needs --curve-secret (the broker's NAME.key_secret from `zdepth keygen`)")
        return None
    from zdepth.protocol.curve import CurveServer

    curve = CurveServer(secret.expanduser(), allow.expanduser() if allow is not None else None)
    _check_certificates(curve)
    if curve.allow_dir is None:
        logger.warning(
            "CurveZMQ without --curve-allow: traffic is encrypted, but any client or worker that knows the broker's public key may connect"
        )
    elif not curve.allow_dir.is_dir():
        raise ConfigError(f"--curve-allow {curve.allow_dir} is not a folder; put the public NAME.key of each allowed client and worker there")
    else:
        allowed = sorted(p.name for p in curve.allow_dir.glob("*.key"))
        if not allowed:
            logger.warning("CurveZMQ allow folder %s holds no NAME.key file: no client or worker can connect", curve.allow_dir)
        else:
            logger.info("CurveZMQ on: %d allowed certificate(s) in %s", len(allowed), curve.allow_dir)
    return curve


def default_curve_dir() -> Path:
    """Where ``zdepth keygen`` writes by default: ``$XDG_CONFIG_HOME/zdepth/curve`` or ``~/.config/zdepth/curve``."""
    from zdepth.profiles import config_dir

    return config_dir() / "curve"


@contextlib.contextmanager
def _curve_hint(curve: Any) -> Iterator[None]:
    """With CurveZMQ, a refused certificate looks exactly like no broker at all: say so."""
    from zdepth.errors import BrokerUnreachable, DeadlineExceeded

    try:
        yield
    except DeadlineExceeded as exc:
        if curve is None or isinstance(exc, BrokerUnreachable):  # an unreachable broker says so itself
            raise
        raise DeadlineExceeded(
            f"{exc}. With CurveZMQ a refused certificate looks the same: check that {_public_sibling(Path(curve.secret_file)).name} "
            f"(the public half of {curve.secret_file}) is in the broker's --curve-allow folder (then restart the broker), "
            f"and that {curve.server_public_file} is the broker's public certificate",
            details=exc.details,
        ) from None


def _split(values: list[str] | None) -> list[str]:
    """Repeatable options that also take comma (or space) lists: ``-m vits,vits-hypersim``."""
    out: list[str] = []
    for value in values or []:
        for item in value.replace(",", " ").split():
            if item not in out:
                out.append(item)
    return out


def _check_models(models: list[str]) -> None:
    from zdepth.engine.weights import get_spec

    for model in models:
        try:
            get_spec(model)
        except ZdepthError as exc:
            raise typer.BadParameter(str(exc), param_hint="--model") from None


def _check_device(device: str) -> str:
    if device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", device):
        return device
    raise typer.BadParameter(f"{device!r} is not a device; use cpu, cuda:N or auto", param_hint="--device")


def _check_precision(precision: Any) -> str | None:
    precision = _value(precision)
    if precision is None or precision == "auto":
        return None
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"{precision!r} is not one of {', '.join(PRECISIONS)} (or auto)", param_hint="--precision")
    return precision


def _check_input_size(input_size: int | None) -> int | None:
    problem = None if input_size is None else input_size_problem(input_size)
    if problem:
        raise typer.BadParameter(problem, param_hint="--input-size")
    return input_size


def _parse_size(text: str, option: str) -> tuple[int, int]:
    """``480x640`` (height x width) -> (480, 640)."""
    try:
        height, width = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not HEIGHTxWIDTH, e.g. 480x640", param_hint=option) from None
    if height < 1 or width < 1:
        raise typer.BadParameter(f"{text!r} must have positive sides", param_hint=option)
    return height, width


def _parse_warmup(values: list[str] | None) -> tuple[tuple[int, int], ...] | None:
    items = _split(values)
    if not items:
        return None
    if items == ["none"]:
        return ()
    return tuple(_parse_size(item, "--warmup") for item in items)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"zdepth {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    log_level: LogLevel = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Depth Anything V2 over ZeroMQ: a broker, one worker per GPU, and clients."""  # the help shown is app's
    global _global_log_level
    _global_log_level = log_level


# ----------------------------------------------------------------------------- servers


@command()
def broker(
    clients: Annotated[str, typer.Option("--clients", envvar="ZDEPTH_CLIENTS", help="Endpoint clients connect to.")] = "tcp://*:5555",
    workers: Annotated[str, typer.Option("--workers", envvar="ZDEPTH_WORKERS", help="Endpoint workers connect to.")] = "tcp://*:5556",
    key: Key = None,
    key_file: KeyFile = None,
    heartbeat: Heartbeat = 1.0,
    liveness: Liveness = 3,
    max_queue: Annotated[
        int,
        typer.Option("--max-queue", envvar="ZDEPTH_MAX_QUEUE", min=1, help="Requests held (waiting, or at workers), all models, before 'overloaded'."),
    ] = 1024,
    max_queue_bytes: Annotated[
        int,
        typer.Option("--max-queue-bytes", envvar="ZDEPTH_MAX_QUEUE_BYTES", min=1, help="Body bytes of the requests held, all clients together, before 'overloaded'."),
    ] = MAX_QUEUE_BYTES,
    max_client_bytes: Annotated[
        int,
        typer.Option("--max-client-bytes", envvar="ZDEPTH_MAX_CLIENT_BYTES", min=1, help="Body bytes of the requests held for one client connection before 'overloaded'."),
    ] = MAX_CLIENT_BYTES,
    client_reply_hwm: Annotated[
        int,
        typer.Option(
            "--client-reply-hwm",
            envvar="ZDEPTH_CLIENT_REPLY_HWM",
            min=1,
            help="Unread replies queued for one client connection; a client that does not read loses its newest replies past it.",
        ),
    ] = CLIENT_REPLY_HWM,
    default_timeout: Annotated[
        float, typer.Option("--default-timeout", envvar="ZDEPTH_DEFAULT_TIMEOUT", min=0.001, help="Deadline in seconds for requests that name none.")
    ] = 30.0,
    drain_timeout: Annotated[
        float, typer.Option("--drain-timeout", envvar="ZDEPTH_DRAIN_TIMEOUT", min=0, help="On stop, seconds to wait for replies in flight.")
    ] = 5.0,
    reconnect_grace: Annotated[
        float,
        typer.Option(
            "--reconnect-grace",
            envvar="ZDEPTH_RECONNECT_GRACE",
            min=0,
            help="Seconds a request for a model with no worker waits, after start-up or after its last worker left, before 'unknown_model'.",
        ),
    ] = 10.0,
    curve_secret: BrokerCurveSecret = None,
    curve_allow: CurveAllow = None,
    metrics_port: MetricsPort = None,
    log_level: LogLevel = None,
) -> None:
    """Run the broker: clients on one endpoint, workers on another; requests routed by model.

    It needs no GPU and no torch. Ctrl-C or SIGTERM stops it.

    CurveZMQ encryption: create the broker's certificate with `zdepth keygen broker`, start it with
    --curve-secret broker.key_secret --curve-allow DIR, copy the public NAME.key of every client
    and worker into DIR, and give them broker.key (--curve-server-key).
    """
    setup_logging(log_level)
    with _errors():
        clients = _address(clients, "--clients", bind=True)
        workers = _address(workers, "--workers", bind=True)
    import zmq

    from zdepth.broker import Broker
    from zdepth.config import BrokerConfig
    from zdepth.metrics import MetricsBindError
    from zdepth.config import Heartbeat as HeartbeatConfig

    with _errors():
        curve = _curve_server(curve_secret, curve_allow)
        config = BrokerConfig(
            clients=clients,
            workers=workers,
            key=_resolve_key(key, key_file),
            heartbeat=HeartbeatConfig(interval_s=heartbeat, liveness=liveness),
            max_queue=max_queue,
            max_queue_bytes=max_queue_bytes,
            max_client_bytes=max_client_bytes,
            client_reply_hwm=client_reply_hwm,
            default_timeout_s=default_timeout,
            drain_timeout_s=drain_timeout,
            reconnect_grace_s=reconnect_grace,
            curve=curve,
            metrics_port=metrics_port,
        )
        server = Broker(config)
        restore = on_stop_signals(server.stop)
        try:
            try:
                bound = server.bind()
            except zmq.ZMQError as exc:
                server.close()
                typer.echo(f"error: {_bind_failure(clients, workers, exc)}", err=True)
                raise typer.Exit(EXIT_ADDRESS) from None
            except MetricsBindError as exc:
                server.close()
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(EXIT_ADDRESS) from None
            report_ready({"clients": bound[0], "workers": bound[1]})
            server.run()
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            restore()


def _bind_failure(clients: str, workers: str, exc: Exception) -> str:
    """Which of the broker's two endpoints cannot be bound, and what usually causes it."""
    import errno

    import zmq

    culprit = None
    with zmq.Context() as ctx:
        for option, endpoint in (("--clients", clients), ("--workers", workers)):
            with ctx.socket(zmq.ROUTER) as probe:
                probe.linger = 0
                try:
                    probe.bind(endpoint)
                except zmq.ZMQError as probe_exc:
                    culprit, exc = (option, endpoint), probe_exc
                    break
    where = f"{culprit[0]} {culprit[1]}" if culprit else f"--clients {clients} / --workers {workers}"
    hint = ""
    if getattr(exc, "errno", None) == errno.EADDRINUSE:
        hint = " (is another zdepth broker or `zdepth serve` running there? stop it, or choose other ports)"
    elif getattr(exc, "errno", None) in (errno.EADDRNOTAVAIL, errno.ENODEV):
        hint = " (no interface of this machine has that address; use * for every interface)"
    reason = zmq.strerror(exc.errno) if getattr(exc, "errno", None) else str(exc)
    return f"cannot listen on {where}: {reason}{hint}"


@command()
def worker(
    broker: Annotated[
        list[str] | None,
        typer.Option(
            "--broker",
            envvar="ZDEPTH_BROKER",
            help="The broker's worker endpoint; repeat it (or give a comma list, or set ZDEPTH_BROKERS) to serve several brokers. Default: tcp://localhost:5556.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", envvar="ZDEPTH_MODEL", help=MODELS_HELP + " Repeat it, or give a comma list. Default: vits.", show_default=False),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", envvar="ZDEPTH_DEVICE", metavar=DEVICE_METAVAR, help="The device to run on; auto: cuda:0 if there is a GPU, else cpu.")
    ] = "auto",
    precision: Precision = None,
    weights_dir: Annotated[
        Path | None,
        typer.Option("--weights-dir", envvar="ZDEPTH_WEIGHTS_DIR", help="Folder of checkpoints. Default: ~/.cache/zdepth/weights.", show_default=False),
    ] = None,
    download: Annotated[bool, typer.Option("--download/--no-download", envvar="ZDEPTH_DOWNLOAD", help="Fetch missing checkpoints from the model hub.")] = False,
    max_batch: MaxBatch = None,
    threads: Threads = None,
    pipeline: Pipeline = True,
    max_pixels: MaxPixels = None,
    max_wait_ms: MaxWaitMs = 0.0,
    capacity: Annotated[
        int | None, typer.Option("--capacity", envvar="ZDEPTH_CAPACITY", min=1, help="Requests held at once. Default: 2 x max batch.", show_default=False)
    ] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", envvar="ZDEPTH_COMPILE", help="torch.compile the models (slow start, faster steps).")] = False,
    cuda_graphs: CudaGraphs = None,
    gpu_decode: GpuDecode = False,
    warmup: Annotated[
        list[str] | None,
        typer.Option("--warmup", envvar="ZDEPTH_WARMUP", help="Frame sizes HxW to warm up on before serving, or 'none'. Default: 480x640.", show_default=False),
    ] = None,
    key: Key = None,
    key_file: KeyFile = None,
    curve_secret: WorkerCurveSecret = None,
    curve_server_key: WorkerCurveServerKey = None,
    heartbeat: Heartbeat = 1.0,
    liveness: Liveness = 3,
    metrics_port: MetricsPort = None,
    log_level: LogLevel = None,
) -> None:
    """Run one worker: load the models on one device and serve the broker's requests.

    The first Ctrl-C or SIGTERM drains (answers what it holds, then exits); a second stops at once.
    """
    setup_logging(log_level)
    models = _split(model) or ["vits"]
    _check_models(models)
    device = _check_device(device)
    precision = _check_precision(precision)
    sizes = _parse_warmup(warmup)
    from zdepth.config import Heartbeat as HeartbeatConfig
    from zdepth.config import WorkerConfig
    from zdepth.worker import run_worker

    with _errors():
        given = _split(broker) or _split([os.environ.get("ZDEPTH_BROKERS", "")]) or ["tcp://localhost:5556"]
        brokers = [_address(b, "--broker") for b in given]
        curve = _curve_pair(curve_secret, curve_server_key)
        _require_torch()
        _fetch_weights(models, weights_dir, download)
        device = _resolve_device(device)
        fields: dict[str, Any] = {}
        if sizes is not None:
            fields["warmup_sizes"] = sizes
        config = WorkerConfig(
            broker=",".join(brokers),
            models=tuple(models),
            key=_resolve_key(key, key_file),
            device=device,
            precision=precision,
            weights_dir=str(weights_dir) if weights_dir else None,
            download=download,
            compile=compile,
            cuda_graphs=cuda_graphs,
            gpu_decode=gpu_decode,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            capacity=capacity,
            threads=threads,
            pipeline=pipeline,
            max_pixels=max_pixels,
            metrics_port=metrics_port,
            heartbeat=HeartbeatConfig(interval_s=heartbeat, liveness=liveness),
            curve=curve,
            **fields,
        )
        code = run_worker(config)
    raise typer.Exit(code)


@command()
def serve(
    clients: Annotated[str, typer.Option("--clients", envvar="ZDEPTH_CLIENTS", help="Endpoint clients connect to.")] = "tcp://*:5555",
    workers: Annotated[
        str, typer.Option("--workers", envvar="ZDEPTH_WORKERS", help="Endpoint workers connect to (also for workers on other hosts).")
    ] = "tcp://*:5556",
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", envvar="ZDEPTH_MODEL", help=MODELS_HELP + " Repeat it, or give a comma list. Default: vits.", show_default=False),
    ] = None,
    device: Annotated[
        list[str] | None,
        typer.Option(
            "--device",
            envvar="ZDEPTH_DEVICE",
            metavar=DEVICE_METAVAR,
            help="Devices to start one worker each on (repeat, or a comma list). Default: every visible GPU, else one CPU worker.",
            show_default=False,
        ),
    ] = None,
    precision: Precision = None,
    max_batch: MaxBatch = None,
    threads: Threads = None,
    pipeline: Pipeline = True,
    max_pixels: MaxPixels = None,
    max_wait_ms: MaxWaitMs = 0.0,
    weights_dir: Annotated[
        Path | None,
        typer.Option("--weights-dir", envvar="ZDEPTH_WEIGHTS_DIR", help="Folder of checkpoints. Default: ~/.cache/zdepth/weights.", show_default=False),
    ] = None,
    download: Annotated[bool, typer.Option("--download/--no-download", envvar="ZDEPTH_DOWNLOAD", help="Fetch missing checkpoints from the model hub.")] = False,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", envvar="ZDEPTH_COMPILE", help="torch.compile the models.")] = False,
    cuda_graphs: CudaGraphs = None,
    gpu_decode: GpuDecode = False,
    warmup: Annotated[
        list[str] | None,
        typer.Option("--warmup", envvar="ZDEPTH_WARMUP", help="Frame sizes HxW the workers warm up on, or 'none'. Default: 480x640.", show_default=False),
    ] = None,
    max_queue: Annotated[
        int, typer.Option("--max-queue", envvar="ZDEPTH_MAX_QUEUE", min=1, help="Requests held (waiting, or at workers) before 'overloaded'.")
    ] = 1024,
    key: Key = None,
    key_file: KeyFile = None,
    curve_secret: BrokerCurveSecret = None,
    curve_allow: CurveAllow = None,
    curve_worker_secret: Annotated[
        Path | None,
        typer.Option(
            "--curve-worker-secret",
            envvar="ZDEPTH_CURVE_WORKER_SECRET",
            help="CurveZMQ: the secret certificate this command's own workers connect with. Default: the broker's own "
            "(--curve-secret), so with --curve-allow put the broker's public NAME.key in that folder too.",
            show_default=False,
        ),
    ] = None,
    heartbeat: Heartbeat = 1.0,
    liveness: Liveness = 3,
    restart_delay: Annotated[
        float, typer.Option("--restart-delay", envvar="ZDEPTH_RESTART_DELAY", min=0, help="Seconds before a crashed process is restarted (doubles while it keeps crashing).")
    ] = 1.0,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            envvar="ZDEPTH_METRICS_PORT",
            min=0,
            max=65535,
            help="Prometheus metrics: the broker on PORT, the workers on PORT+1, PORT+2, ... in --device order. Default: off.",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevel = None,
) -> None:
    """Run a broker and one worker per GPU on this machine, and keep them running.

    Each is its own process; one that crashes is logged and restarted. Ctrl-C or SIGTERM stops them all: workers drain first, then the broker stops.

    CurveZMQ: --curve-secret and --curve-allow go to the broker as in `zdepth broker`. The local workers
    connect with --curve-worker-secret, by default the broker's own certificate (so with --curve-allow,
    copy the broker's public NAME.key into the allow folder; serve refuses to start otherwise).
    """
    setup_logging(log_level)
    models = _split(model) or ["vits"]
    _check_models(models)
    precision = _check_precision(precision)
    sizes = _parse_warmup(warmup)
    devices = [_check_device(d) for d in _split(device)]
    from zdepth.supervisor import ChildSpec, Supervisor, connect_address, detect_devices

    with _errors():
        clients = _address(clients, "--clients", bind=True)
        workers = _address(workers, "--workers", bind=True)
        secret = _resolve_key(key, key_file)
        broker_curve, worker_curve = _serve_curve(curve_secret, curve_allow, curve_worker_secret)
        if not devices or devices == ["auto"]:
            devices = detect_devices()
        _require_torch()
        _fetch_weights(models, weights_dir, download)  # once, here, rather than in every worker at once
        level = str(_value(log_level) or _value(_global_log_level) or "info").lower()
        # Children get every CurveZMQ setting on their command line (paths only), none from the environment.
        env: dict[str, str | None] = {name: None for name in CURVE_ENVS}
        if secret:
            env["ZDEPTH_KEY"] = secret
        common = ["--heartbeat", str(heartbeat), "--liveness", str(liveness), "--log-level", level]
        python = [sys.executable, "-m", "zdepth"]
        broker_args = ["--max-queue", str(max_queue)]
        if broker_curve is not None:
            broker_args += ["--curve-secret", str(broker_curve.secret_file)]
            if broker_curve.allow_dir is not None:
                broker_args += ["--curve-allow", str(broker_curve.allow_dir)]

        def broker_argv(ready: dict[str, Any]) -> list[str]:
            """After a first start on port *, a restart binds the ports the first one got, which the workers know."""
            bound = ready.get("broker") or {}
            endpoints = [bound.get(name) if bound.get(name) and given.endswith(":*") else given for name, given in (("clients", clients), ("workers", workers))]
            return [*python, "broker", "--clients", endpoints[0], "--workers", endpoints[1], *broker_args, *common]

        if metrics_port is not None:
            if metrics_port and metrics_port + len(devices) > 65535:
                raise ConfigError(f"--metrics-port {metrics_port} leaves no port for {len(devices)} workers (they take the next ports)")
            broker_args += ["--metrics-port", str(metrics_port)]
        env["ZDEPTH_METRICS_PORT"] = None  # each child gets its own port on its command line, never a shared one
        worker_args = ["--max-wait-ms", str(max_wait_ms), "--pipeline" if pipeline else "--no-pipeline"]
        if max_batch is not None:
            worker_args += ["--max-batch", str(max_batch)]
        if threads is not None:
            worker_args += ["--threads", str(threads)]
        if max_pixels is not None:
            worker_args += ["--max-pixels", str(max_pixels)]
        if worker_curve is not None:
            worker_args += ["--curve-secret", str(worker_curve.secret_file), "--curve-server-key", str(worker_curve.server_public_file)]
        for m in models:
            worker_args += ["--model", m]
        if precision:
            worker_args += ["--precision", precision]
        if weights_dir:
            worker_args += ["--weights-dir", str(weights_dir.expanduser().absolute())]
        worker_args += ["--download" if download else "--no-download", "--compile" if compile else "--no-compile"]
        if cuda_graphs is not None:
            worker_args.append("--cuda-graphs" if cuda_graphs else "--no-cuda-graphs")
        worker_args.append("--gpu-decode" if gpu_decode else "--no-gpu-decode")
        if sizes is not None:
            worker_args += ["--warmup", ",".join(f"{h}x{w}" for h, w in sizes) or "none"]

        def worker_argv(dev: str, index: int):
            own = [] if metrics_port is None else ["--metrics-port", str(metrics_port + 1 + index if metrics_port else 0)]

            def argv(ready: dict[str, Any]) -> list[str]:
                """Pointed at the worker endpoint our own broker reported, never at whatever else listens there."""
                endpoint = connect_address(ready["broker"]["workers"])
                return [*python, "worker", "--broker", endpoint, "--device", dev, *worker_args, *own, *common]

            return argv

        children = [ChildSpec("broker", broker_argv, env, stop_timeout_s=15.0, group=0, ready=True)]
        children += [ChildSpec(f"worker {dev}", worker_argv(dev, i), env, stop_timeout_s=30.0, group=1) for i, dev in enumerate(devices)]
        supervisor = Supervisor(children, restart_delay_s=restart_delay)
        logger.info(
            "serving %s on %s (workers on %s): %d worker(s) on %s", ", ".join(models), clients, workers, len(devices), ", ".join(devices)
        )
        restore = on_stop_signals(supervisor.stop)
        try:
            code = supervisor.run()
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            restore()
    raise typer.Exit(code)


def _resolve_device(device: str) -> str:
    """``auto`` made concrete; ConfigError (exit 2) in CLI words for a CUDA device this machine does not have."""
    import torch  # a worker imports torch anyway

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def _require_torch() -> None:
    """ModuleNotFoundError (exit 3, with the install command) now, rather than a traceback from a child later."""
    import importlib.util

    for name in ("torch", "torchvision"):
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _fetch_weights(models: list[str], weights_dir: Path | None, download: bool) -> None:
    """Every checkpoint present, fetched first with --download; WeightsNotFound (exit 3) names the file and where to get it."""
    from zdepth.engine.weights import find_checkpoint

    for model in models:
        find_checkpoint(model, weights_dir, download=download)


def _serve_curve(secret: Path | None, allow: Path | None, worker_secret: Path | None):
    """(CurveServer, CurveClient) for serve's broker and its local workers, or (None, None).

    Paths are made absolute (children restart in the same folder, but logs read better). The workers'
    certificate defaults to the broker's own; its public key must then be allowed, which is checked here.
    """
    if secret is None:
        if allow is not None or worker_secret is not None:
            raise ConfigError("--curve-allow and --curve-worker-secret need --curve-secret (the broker's NAME.key_secret)")
        return None, None
    import zmq.auth

    from zdepth.protocol.curve import CurveClient

    secret = secret.expanduser().absolute()
    allow = allow.expanduser().absolute() if allow is not None else None
    server = _curve_server(secret, allow)
    worker_file = worker_secret.expanduser().absolute() if worker_secret is not None else secret
    # The workers need the broker's public key: its NAME.key beside the secret, else the secret file itself
    # (a worker reads only the public half of a --curve-server-key file).
    public = _public_sibling(secret)
    client = CurveClient(worker_file, public if public.is_file() else secret)
    _check_certificates(client)
    if allow is not None:
        worker_key, _ = zmq.auth.load_certificate(worker_file)
        if worker_key not in zmq.auth.load_certificates(allow):
            own = _public_sibling(worker_file)
            raise ConfigError(
                f"serve's workers connect with {worker_file}, whose public key is not in --curve-allow {allow}: "
                f"copy {own if own.is_file() else 'its NAME.key'} into {allow}, or pass --curve-worker-secret with an allowed certificate"
            )
    return server, client


def _public_sibling(secret_file: Path) -> Path:
    """``NAME.key`` for ``NAME.key_secret``."""
    name = secret_file.name
    return secret_file.with_name(name[: -len("_secret")] if name.endswith(".key_secret") else name + ".key")


# ----------------------------------------------------------------------------- keys


@command()
def keygen(
    name: Annotated[str, typer.Argument(help="Certificate name, e.g. broker, robot-3 or gpu-box: writes NAME.key and NAME.key_secret.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--curve-dir",
            "--out",
            "-o",
            envvar="ZDEPTH_CURVE_DIR",
            help="Folder to write to (created, mode 700 if new). Default: ~/.config/zdepth/curve (XDG_CONFIG_HOME honoured).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", envvar="ZDEPTH_FORCE", help="Overwrite an existing certificate of that name.")] = False,
    log_level: LogLevel = None,
) -> None:
    """Create a CurveZMQ certificate pair for the broker, a client or a worker.

    NAME.key is public (copy it freely); NAME.key_secret is secret (mode 600; it never leaves this machine).
    The broker's NAME.key goes to every client and worker (--curve-server-key); each client's and worker's
    NAME.key goes into the broker's --curve-allow folder.
    """
    import os

    setup_logging(log_level)
    with _errors():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
            raise ConfigError(f"{name!r} is not a certificate name: use letters, digits, '.', '_' and '-' (e.g. robot-3)")
        folder = (out if out is not None else default_curve_dir()).expanduser()
        public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
        if (public.exists() or secret.exists()) and not force:
            raise ConfigError(f"certificate {name} already exists in {folder}; pass --force to replace it (peers holding the old one lose access)")
        from zdepth.protocol.curve import generate

        previous = os.umask(0o077)  # the secret is never readable by others, not even before its chmod
        try:
            public, secret = generate(folder, name)
        except OSError as exc:
            raise ConfigError(f"cannot write certificates into {folder}: {exc.strerror or exc}") from exc
        finally:
            os.umask(previous)
        public.chmod(0o644)  # public: others may read it
    typer.echo(
        f"wrote {public}  (public: copy it where it is needed)\n"
        f"      {secret}  (secret, mode 600: keep it on this machine)\n"
        "\n"
        "As the broker's certificate:\n"
        f"  zdepth broker --curve-secret {secret} --curve-allow ALLOW_DIR\n"
        f"  then give {public.name} to every client and worker (their --curve-server-key).\n"
        "As a client's or a worker's certificate:\n"
        f"  copy {public} into the broker's ALLOW_DIR and restart the broker, then use\n"
        f"  --curve-secret {secret} --curve-server-key BROKER.key\n"
        "  (or curve_secret and curve_server_key in a profile)."
    )


# ----------------------------------------------------------------------------- clients


@command()
def predict(
    ctx: typer.Context,
    images: Annotated[
        list[str],
        typer.Argument(help="Image files, folders, globs (quote them), video files and http(s) image URLs (downloaded here, never by the server).", show_default=False),
    ],
    server: Server = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", envvar="ZDEPTH_MODEL", help=MODELS_HELP + " Default: vits in-process; the profile's or the server's choice otherwise.", show_default=False),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", envvar="ZDEPTH_OUT", help="Output folder (created if needed).")] = Path("depth"),
    formats: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            "-f",
            envvar="ZDEPTH_FORMAT",
            help="Outputs, repeated or a comma list: npy (NAME.npy, float32), png16 (NAME.depth.png: metric in mm, relative scaled to 0..65535), "
            "color (NAME.color.png), ply (NAME.ply, coloured points; needs intrinsics and a metric model). Default: npy,color.",
            show_default=False,
        ),
    ] = None,
    max_depth: Annotated[
        float | None,
        typer.Option("--max-depth", envvar="ZDEPTH_MAX_DEPTH", help="Metric models: depth range in metres. Default: 20 hypersim, 80 vkitti.", show_default=False),
    ] = None,
    input_size: Annotated[
        int | None, typer.Option("--input-size", envvar="ZDEPTH_INPUT_SIZE", help="Network input side, a multiple of 14 (smaller is faster). Default: 518.", show_default=False)
    ] = None,
    device: Annotated[
        str, typer.Option("--device", envvar="ZDEPTH_DEVICE", metavar=DEVICE_METAVAR, help="In-process only: the device to run on.")
    ] = "auto",
    precision: Annotated[
        PrecisionName | None,
        typer.Option("--precision", envvar="ZDEPTH_PRECISION", help="In-process only. Default (auto): fp16 on CUDA, fp32 on CPU.", show_default=False),
    ] = None,
    weights_dir: Annotated[
        Path | None, typer.Option("--weights-dir", envvar="ZDEPTH_WEIGHTS_DIR", help="In-process only: folder of checkpoints.", show_default=False)
    ] = None,
    download: Annotated[bool, typer.Option("--download/--no-download", envvar="ZDEPTH_DOWNLOAD", help="In-process only: fetch a missing checkpoint.")] = False,
    fx: Annotated[float | None, typer.Option("--fx", envvar="ZDEPTH_FX", help="Focal length x in pixels (for ply).", show_default=False)] = None,
    fy: Annotated[float | None, typer.Option("--fy", envvar="ZDEPTH_FY", help="Focal length y in pixels.", show_default=False)] = None,
    cx: Annotated[float | None, typer.Option("--cx", envvar="ZDEPTH_CX", help="Principal point x in pixels (within the image).", show_default=False)] = None,
    cy: Annotated[float | None, typer.Option("--cy", envvar="ZDEPTH_CY", help="Principal point y in pixels (within the image).", show_default=False)] = None,
    intrinsics: Annotated[
        Path | None,
        typer.Option(
            "--intrinsics", envvar="ZDEPTH_INTRINSICS", help="File with a 3x3 camera matrix (text, .npy or .json), instead of --fx --fy --cx --cy.", show_default=False
        ),
    ] = None,
    every: Annotated[int, typer.Option("--every", envvar="ZDEPTH_EVERY", min=1, help="Videos: predict every Nth frame (outputs named STEM_000123.*).")] = 1,
    colormap: Annotated[Colormap, typer.Option("--colormap", envvar="ZDEPTH_COLORMAP", help="cv2 colour map for the color output.")] = Colormap.inferno,
    depth_scale: Annotated[
        float, typer.Option("--depth-scale", envvar="ZDEPTH_DEPTH_SCALE", help="png16 of metric depth: units per metre (1000 = mm).")
    ] = 1000.0,
    in_flight: Annotated[int, typer.Option("--in-flight", envvar="ZDEPTH_IN_FLIGHT", min=1, help="Server only: requests in flight at once.")] = 4,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", envvar="ZDEPTH_TIMEOUT", min=0.001, help="Server only: seconds to wait for each reply. Default: the profile's timeout, else 30.", show_default=False),
    ] = None,
    key: Key = None,
    key_file: KeyFile = None,
    curve_secret: ClientCurveSecret = None,
    curve_server_key: ClientCurveServerKey = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", envvar="ZDEPTH_PROGRESS", help="Show a progress bar (on a terminal).")] = True,
    json_out: JsonOut = False,
    log_level: LogLevel = None,
) -> None:
    """Predict depth for images, folders, globs, videos and image URLs; write npy, 16-bit png, colour png or ply files.

    With --server the work goes to a zdepth broker; without one, the model runs in this process (torch needed), so it works with nothing else running.
    """
    setup_logging(log_level)
    _check_input_size(input_size)
    from zdepth.client import files as runner

    with _errors():
        fmts = runner.parse_formats(formats or ["npy,color"])
        intr = _intrinsics(fx, fy, cx, cy, intrinsics)
        device = _check_device(device)
        precision = _check_precision(precision)
        target = None
        if server:
            target = _resolve_target(
                ctx, server, key=key, key_file=key_file, curve_secret=curve_secret, curve_server_key=curve_server_key, timeout=timeout, model=model
            )
            model = target.model
        elif model is None:
            model = "vits"
        if model is not None:
            _check_models([model])
        from zdepth.models import is_metric_model

        metric = model is not None and is_metric_model(model)
        if max_depth is not None and not metric:
            raise ConfigError("--max-depth applies to metric models only; pass one such as --model vits-hypersim")
        options = runner.OutputOptions(out_dir=out, formats=fmts, metric=metric, intrinsics=intr, colormap=_value(colormap), depth_scale=depth_scale)
        sources, missing = runner.expand_inputs(images)
        if not sources:
            _print_predict_summary(runner.Summary(failures=missing), out, json_out)
            raise typer.Exit(1)
        with contextlib.ExitStack() as stack:
            if target is None:
                predictor = runner.local_predictor(
                    model,
                    device=device,
                    precision=precision,
                    weights_dir=str(weights_dir) if weights_dir else None,
                    download=download,
                    input_size=input_size or DEFAULT_INPUT_SIZE,
                    max_depth=max_depth,
                )
            else:
                wait = target.timeout or 30.0
                _probe(target, wait, model)
                client = stack.enter_context(_client(target, wait, model))
                predictor = runner.remote_predictor(client, model, metric=metric, input_size=input_size, max_depth=max_depth, max_in_flight=in_flight)
            advance = stack.enter_context(_progress(sources, every, enabled=progress and not json_out))
            # Images by URL are downloaded here, within the client's timeout (--timeout) with a server.
            url_timeout = runner.DEFAULT_URL_TIMEOUT_S if target is None else wait
            summary = runner.run(sources, predictor, options, every=every, advance=advance, url_timeout=url_timeout)
        summary.failures[:0] = missing
    _print_predict_summary(summary, out, json_out)
    if summary.failures:
        raise typer.Exit(1)


def _intrinsics(fx, fy, cx, cy, path: Path | None):
    from zdepth.pointcloud import Intrinsics

    given = [v is not None for v in (fx, fy, cx, cy)]
    if path is not None:
        if any(given):
            raise ConfigError("give either --intrinsics FILE or --fx --fy --cx --cy, not both")
        return Intrinsics.from_file(path)
    if any(given) and not all(given):
        raise ConfigError("give all four of --fx --fy --cx --cy (pixels), or --intrinsics FILE")
    if not any(given):
        return None
    try:
        return Intrinsics(fx, fy, cx, cy)
    except ZdepthError as exc:
        raise ConfigError(str(exc)) from None


def _probe(target: _Target, timeout: float, model: str | None) -> dict[str, Any]:
    """One health request that fails fast (5 s at most) when no broker answers; warns if ``model`` is not served."""
    from zdepth.client.sync import Client

    address = target.address
    with _curve_hint(target.curve), Client(address, key=target.key, timeout=min(timeout, 5.0), retries=0, curve=target.curve) as probe:
        health = probe.health()
    served = health.get("models") or []
    if not health.get("workers"):
        logger.warning("%s has no worker connected yet: requests wait for one, then fail", address)
    elif model is not None and model not in served:
        logger.warning("%s serves %s, not %s: requests will fail with unknown_model", address, ", ".join(served), model)
    return health


def _client(target: _Target, timeout: float, model: str | None):
    """A client whose default model is ``model`` (None: the broker picks)."""
    from zdepth.client.sync import Client

    encoder, dataset = split_model_id(model)
    kwargs: dict[str, Any] = {"encoder": encoder}
    if dataset:
        kwargs["dataset"] = dataset
    return Client(target.address, key=target.key, timeout=timeout, curve=target.curve, **kwargs)


@contextlib.contextmanager
def _progress(sources, every: int, *, enabled: bool):
    """A rich progress bar on a terminal's stderr; elsewhere nothing."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from zdepth.client.files import count_frames

    counts = [count_frames(s, every) for s in sources]
    total = None if any(c is None for c in counts) else sum(counts)
    bar = Progress(
        TextColumn("depth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True
    )
    with bar:
        task = bar.add_task("depth", total=total)
        yield lambda n: bar.advance(task, n)


def _print_predict_summary(summary, out: Path, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps({**summary.as_dict(), "out": str(out)}))
        return
    per = f", {summary.ms_per_frame:.1f} ms per image" if summary.ms_per_frame is not None else ""
    typer.echo(f"{summary.frames} image(s) in {summary.seconds:.2f} s{per}; {summary.written} file(s) written to {out}")
    if summary.failures:
        typer.echo(f"{len(summary.failures)} failed:")
        for failure in summary.failures:
            typer.echo(f"  {failure.name}: {_cli_words(failure.reason)}")


@command()
def health(
    ctx: typer.Context,
    server: Server = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", envvar="ZDEPTH_TIMEOUT", min=0.001, help="Seconds to wait for the broker. Default: the profile's timeout, else 5.", show_default=False),
    ] = None,
    key: Key = None,
    key_file: KeyFile = None,
    curve_secret: ClientCurveSecret = None,
    curve_server_key: ClientCurveServerKey = None,
    json_out: JsonOut = False,
    log_level: LogLevel = None,
) -> None:
    """Show the broker's workers: device, models, load, requests served and uptime."""
    setup_logging(log_level)
    from zdepth.client.sync import Client

    with _errors():
        target = _resolve_target(ctx, server, key=key, key_file=key_file, curve_secret=curve_secret, curve_server_key=curve_server_key, timeout=timeout)
        address = target.address
        wait = target.timeout or 5.0
        with _curve_hint(target.curve), Client(address, key=target.key, timeout=wait, retries=0, curve=target.curve) as client:
            several = len(client.addresses) > 1
            info = client.health_all() if several else client.health()
    if not several:
        typer.echo(json.dumps({"server": address, **info}, indent=2, sort_keys=True) if json_out else format_health(address, info))
        return
    # Several brokers: each one's health, and a non-zero exit when any is down, so a dead standby shows in scripts.
    brokers = info["brokers"]
    if json_out:
        typer.echo(json.dumps({"server": address, "brokers": brokers}, indent=2, sort_keys=True))
    else:
        typer.echo("\n\n".join(format_health(b["address"], b["health"]) if "health" in b else f"{b['address']}: {b['error']}" for b in brokers))
    if any("error" in b for b in brokers):
        raise typer.Exit(1)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_health(address: str, info: dict[str, Any]) -> str:
    """The health map as a plain text table (no colours, so it reads the same in logs)."""
    queued = info.get("queued_total", 0)
    lines = [
        (
            f"broker {address}  version {info.get('version', '?')}  up {_duration(info.get('uptime_s'))}  "
            f"queued {queued}/{info.get('queue_limit', '?')}  in flight {info.get('in_flight', 0)}"
        ),
        f"models: {', '.join(info.get('models') or []) or '(none)'}",
        "",
    ]
    workers = info.get("workers") or []
    if not workers:
        lines.append("no workers connected")
        return "\n".join(lines)
    header = ("WORKER", "HOST", "DEVICE", "PRECISION", "MODELS", "LOAD", "SERVED", "FAILED", "UPTIME", "STATE")
    rows = [
        (
            str(w.get("name", "?")),
            str(w.get("host") or w.get("peer") or "-"),
            str(w.get("device") or "-"),
            str(w.get("precision") or "-"),
            ",".join(w.get("models") or []),
            f"{w.get('in_flight', 0)}/{w.get('capacity', '?')}",
            str(w.get("served", 0)),
            str(w.get("failed", 0)),
            _duration(w.get("uptime_s")),
            "draining" if w.get("draining") else "ready",
        )
        for w in workers
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)


@command()
def bench(
    ctx: typer.Context,
    server: Server = None,
    clients: Annotated[
        int,
        typer.Option(
            "--streams", "--clients", "-c", envvar="ZDEPTH_STREAMS", min=1,
            help="Concurrent client streams, each its own thread and socket.",
        ),
    ] = 4,
    seconds: Annotated[float, typer.Option("--seconds", "-t", envvar="ZDEPTH_SECONDS", min=0.1, help="How long to measure.")] = 10.0,
    size: Annotated[str, typer.Option("--size", envvar="ZDEPTH_SIZE", help="Synthetic frame size HEIGHTxWIDTH (when no --image).")] = "480x640",
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", "-i", envvar="ZDEPTH_IMAGE", help="Real images to send instead of synthetic frames (repeatable).", show_default=False),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", envvar="ZDEPTH_MODEL", help=MODELS_HELP, show_default=False)] = None,
    input_size: Annotated[int | None, typer.Option("--input-size", envvar="ZDEPTH_INPUT_SIZE", help="Network input side, a multiple of 14.", show_default=False)] = None,
    in_flight: Annotated[int, typer.Option("--in-flight", envvar="ZDEPTH_IN_FLIGHT", min=1, help="Requests each stream keeps in flight (pipelining).")] = 1,
    wire_format: Annotated[WireFormat, typer.Option("--wire-format", envvar="ZDEPTH_WIRE_FORMAT", help="How frames travel: raw pixels or jpeg.")] = WireFormat.raw,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", envvar="ZDEPTH_TIMEOUT", min=0.001, help="Seconds to wait for each reply. Default: the profile's timeout, else 30.", show_default=False),
    ] = None,
    key: Key = None,
    key_file: KeyFile = None,
    curve_secret: ClientCurveSecret = None,
    curve_server_key: ClientCurveServerKey = None,
    json_out: JsonOut = False,
    log_level: LogLevel = None,
) -> None:
    """Load-test a server: N client streams for S seconds; frames per second, latency p50/p90/p99 and errors."""
    setup_logging(log_level)
    _check_input_size(input_size)
    wire_format = _value(wire_format)
    from zdepth.client.bench import make_frames, run_bench

    with _errors():
        target = _resolve_target(
            ctx, server, key=key, key_file=key_file, curve_secret=curve_secret, curve_server_key=curve_server_key, timeout=timeout, model=model
        )
        address = target.address
        model = target.model
        timeout = target.timeout or 30.0
        if model is not None:
            _check_models([model])
        frames = make_frames(image, _parse_size(size, "--size"))
        _probe(target, timeout, model)
        report = run_bench(
            address,
            frames,
            key=target.key,
            curve=target.curve,
            clients=clients,
            seconds=seconds,
            model=model,
            input_size=input_size,
            in_flight=in_flight,
            wire_format=wire_format,
            timeout=timeout,
        )
    if json_out:
        typer.echo(json.dumps({"server": address, **report}, indent=2))
    else:
        typer.echo(format_bench(address, report))
    if report["frames"] == 0:
        raise typer.Exit(1)


def format_bench(address: str, report: dict[str, Any]) -> str:
    lat = report["latency_ms"]
    lines = [
        (
            f"bench: {report['clients']} client(s) x {report['in_flight']} in flight, {report['seconds']:.1f} s, "
            f"{report['size']} frames, model {report['model'] or '(server default)'}, against {address}"
        ),
        f"frames      {report['frames']}  ({report['fps']:.1f} frames/s)",
    ]
    if report["frames"]:
        lines.append(
            f"latency ms  p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}  (mean {lat['mean']:.1f}, min {lat['min']:.1f}, max {lat['max']:.1f})"
        )
    errors = report["errors"]
    detail = ", ".join(f"{code} {n}" for code, n in sorted(report["errors_by_code"].items()))
    lines.append(f"errors      {errors}" + (f"  ({detail})" if detail else ""))
    for message in report.get("error_samples", []):
        lines.append(f"  e.g. {message}")
    return "\n".join(lines)


from zdepth.gateway import gateway_command  # noqa: E402  (FastAPI is imported only when the command runs)

command("gateway")(gateway_command)
