"""Options that several commands take, declared once as ``Annotated`` types, and their parsing.

One declaration per option keeps its name, environment variable (``ZDEPTH_`` and the
name) and help the same in every command that takes it: the client commands (predict,
health, bench) share the server, key and CurveZMQ options; worker and serve share the
engine's (device, precision, batching, threads, ...).
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from zdepth.errors import ZdepthError
from zdepth.models import input_size_problem
from zdepth.protocol import compression

DEFAULT_SERVER = "tcp://localhost:5555"
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


# The request param depth_codec's values, from the protocol, so a new codec shows here by itself.
DepthCodecName = enum.Enum("DepthCodecName", {c: c for c in compression.CODECS}, type=str)


# cv2's colour maps (cv2.COLORMAP_*), for --colormap.
Colormap = enum.Enum("Colormap", {m: m for m in (
    "autumn", "bone", "jet", "winter", "rainbow", "ocean", "summer", "spring", "cool", "hsv", "pink", "hot", "parula",
    "magma", "inferno", "plasma", "viridis", "cividis", "twilight", "twilight_shifted", "turbo", "deepgreen",
)}, type=str)  # fmt: skip


def value(choice: Any) -> Any:
    """An enum option's plain value (None stays None)."""
    return choice.value if isinstance(choice, enum.Enum) else choice


# ----------------------------------------------------------------------------- every command

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

# ----------------------------------------------------------------------------- broker, worker and serve

Clients = Annotated[str, typer.Option("--clients", envvar="ZDEPTH_CLIENTS", help="Endpoint clients connect to.")]
Heartbeat = Annotated[float, typer.Option("--heartbeat", envvar="ZDEPTH_HEARTBEAT", min=0.01, help="Seconds between heartbeats.")]
Liveness = Annotated[
    int, typer.Option("--liveness", envvar="ZDEPTH_LIVENESS", min=1, help="Missed heartbeats before a peer counts as dead.")
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

# ----------------------------------------------------------------------------- the engine: worker and serve

Models = Annotated[
    list[str] | None,
    typer.Option("--model", "-m", envvar="ZDEPTH_MODEL", help=MODELS_HELP + " Repeat it, or give a comma list. Default: vits.", show_default=False),
]
Precision = Annotated[
    PrecisionName | None,
    typer.Option("--precision", envvar="ZDEPTH_PRECISION", help="Default (auto): fp16 on CUDA, fp32 on CPU.", show_default=False),
]
WeightsDir = Annotated[
    Path | None,
    typer.Option("--weights-dir", envvar="ZDEPTH_WEIGHTS_DIR", help="Folder of checkpoints. Default: ~/.cache/zdepth/weights.", show_default=False),
]
Download = Annotated[bool, typer.Option("--download/--no-download", envvar="ZDEPTH_DOWNLOAD", help="Fetch missing checkpoints from the model hub.")]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", envvar="ZDEPTH_COMPILE", help="torch.compile the models (slow start, faster steps).")]
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
Warmup = Annotated[
    list[str] | None,
    typer.Option("--warmup", envvar="ZDEPTH_WARMUP", help="Frame sizes HxW to warm up on before serving, or 'none'. Default: 480x640.", show_default=False),
]

# ----------------------------------------------------------------------------- client commands: predict, health and bench

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
DepthCodec = Annotated[
    DepthCodecName,
    typer.Option(
        "--depth-codec",
        envvar="ZDEPTH_DEPTH_CODEC",
        help="How a server sends depth maps back. zstd: losslessly compressed, fewer bytes for a little CPU on both ends; "
        "worth it on a 1 GbE link, not on loopback or 10 GbE. Needs the zstandard package, here and on the workers "
        "(the zstd extra of zdepth). predict in-process ignores it.",
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", envvar="ZDEPTH_JSON", help="Print JSON for scripts instead of text.")]
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


def client_timeout(help: str) -> Any:
    """--timeout of a client command; only what it waits for, and its default, differ between commands."""
    return Annotated[float | None, typer.Option("--timeout", envvar="ZDEPTH_TIMEOUT", min=0.001, help=help, show_default=False)]


# ----------------------------------------------------------------------------- parsing what typer cannot check


def split(values: list[str] | None) -> list[str]:
    """Repeatable options that also take comma (or space) lists: ``-m vits,vits-hypersim``."""
    out: list[str] = []
    for item_list in values or []:
        for item in item_list.replace(",", " ").split():
            if item not in out:
                out.append(item)
    return out


def check_models(models: list[str]) -> None:
    from zdepth.engine.weights import get_spec

    for model in models:
        try:
            get_spec(model)
        except ZdepthError as exc:
            raise typer.BadParameter(str(exc), param_hint="--model") from None


def check_device(device: str) -> str:
    if device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", device):
        return device
    raise typer.BadParameter(f"{device!r} is not a device; use cpu, cuda:N or auto", param_hint="--device")


def check_precision(precision: Any) -> str | None:
    precision = value(precision)
    if precision is None or precision == "auto":
        return None
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"{precision!r} is not one of {', '.join(PRECISIONS)} (or auto)", param_hint="--precision")
    return precision


def check_input_size(input_size: int | None) -> int | None:
    problem = None if input_size is None else input_size_problem(input_size)
    if problem:
        raise typer.BadParameter(problem, param_hint="--input-size")
    return input_size


def parse_size(text: str, option: str) -> tuple[int, int]:
    """``480x640`` (height x width) -> (480, 640)."""
    try:
        height, width = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not HEIGHTxWIDTH, e.g. 480x640", param_hint=option) from None
    if height < 1 or width < 1:
        raise typer.BadParameter(f"{text!r} must have positive sides", param_hint=option)
    return height, width


def parse_warmup(values: list[str] | None) -> tuple[tuple[int, int], ...] | None:
    items = split(values)
    if not items:
        return None
    if items == ["none"]:
        return ()
    return tuple(parse_size(item, "--warmup") for item in items)
