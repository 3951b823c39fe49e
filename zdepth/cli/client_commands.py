"""The client commands: ``predict`` (in-process or against a server), ``health`` and ``bench``.

They share how a server is named (``--server``: an address or a profile, with its key, timeout and
CurveZMQ certificates; see ``zdepth.profiles.resolve_target``) and print through ``tables``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from zdepth.errors import ConfigError, ZdepthError
from zdepth.exits import EXIT_MISSING
from zdepth.models import DEFAULT_INPUT_SIZE, split_model_id
from zdepth.profiles import Target
from zdepth.protocol import compression
from zdepth.protocol.curve import explain_refusal

from .common import errors, resolve_target, setup_logging
from .options import (
    DEVICE_METAVAR,
    MODELS_HELP,
    ClientCurveSecret,
    ClientCurveServerKey,
    Colormap,
    DepthCodec,
    DepthCodecName,
    JsonOut,
    Key,
    KeyFile,
    LogLevel,
    PrecisionName,
    Server,
    WireFormat,
    check_device,
    check_input_size,
    check_models,
    check_precision,
    client_timeout,
    parse_size,
    value,
)  # fmt: skip
from .root import command
from .tables import format_bench, format_health, format_predict_summary

logger = logging.getLogger("zdepth.cli")

PredictTimeout = client_timeout("Server only: seconds to wait for each reply. Default: the profile's timeout, else 30.")
HealthTimeout = client_timeout("Seconds to wait for the broker. Default: the profile's timeout, else 5.")
BenchTimeout = client_timeout("Seconds to wait for each reply. Default: the profile's timeout, else 30.")


def resolve_server(server: str | None, key: str | None = None, key_file: Path | None = None) -> tuple[str, str | None, str | None]:
    """(address, key, default model) for ``--server``: an address (``tcp://host:5555``, ``host:5555``, ...) or a profile name.

    The profile's key is used unless ``--key``/``--key-file`` say otherwise.
    """
    target = resolve_target(None, server, key=key, key_file=key_file)
    return target.address, target.key, target.model


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
    depth_codec: DepthCodec = DepthCodecName.none,
    timeout: PredictTimeout = None,
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
    check_input_size(input_size)
    from zdepth.client import files as runner

    with errors():
        fmts = runner.parse_formats(formats or ["npy,color"])
        intr = _intrinsics(fx, fy, cx, cy, intrinsics)
        device = check_device(device)
        precision = check_precision(precision)
        target = None
        if server:
            target = resolve_target(
                ctx, server, key=key, key_file=key_file, curve_secret=curve_secret, curve_server_key=curve_server_key, timeout=timeout, model=model
            )
            model = target.model
            depth_codec = _depth_codec(depth_codec)
        elif model is None:
            model = "vits"
        if model is not None:
            check_models([model])
        from zdepth.models import is_metric_model

        metric = model is not None and is_metric_model(model)
        if max_depth is not None and not metric:
            raise ConfigError("--max-depth applies to metric models only; pass one such as --model vits-hypersim")
        options = runner.OutputOptions(out_dir=out, formats=fmts, metric=metric, intrinsics=intr, colormap=value(colormap), depth_scale=depth_scale)
        sources, missing = runner.expand_inputs(images)
        if not sources:
            typer.echo(format_predict_summary(runner.Summary(failures=missing), out, json_out))
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
                client = stack.enter_context(_client(target, wait, model, depth_codec=depth_codec))
                predictor = runner.remote_predictor(client, model, metric=metric, input_size=input_size, max_depth=max_depth, max_in_flight=in_flight)
            advance = stack.enter_context(_progress(sources, every, enabled=progress and not json_out))
            # Images by URL are downloaded here, within the client's timeout (--timeout) with a server.
            url_timeout = runner.DEFAULT_URL_TIMEOUT_S if target is None else wait
            summary = runner.run(sources, predictor, options, every=every, advance=advance, url_timeout=url_timeout)
        summary.failures[:0] = missing
    typer.echo(format_predict_summary(summary, out, json_out))
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


def _probe(target: Target, timeout: float, model: str | None) -> dict[str, Any]:
    """One health request that fails fast (5 s at most) when no broker answers; warns if ``model`` is not served."""
    from zdepth.client.sync import Client

    address = target.address
    with explain_refusal(target.curve), Client(address, key=target.key, timeout=min(timeout, 5.0), retries=0, curve=target.curve) as probe:
        health = probe.health()
    served = health.get("models") or []
    if not health.get("workers"):
        logger.warning("%s has no worker connected yet: requests wait for one, then fail", address)
    elif model is not None and model not in served:
        logger.warning("%s serves %s, not %s: requests will fail with unknown_model", address, ", ".join(served), model)
    return health


def _depth_codec(choice: Any) -> str:
    """``--depth-codec`` as the Client takes it. zstd without zstandard here ends the command with the Client's
    own reason (which names the package to install) as one line, exit 3, before anything is sent."""
    codec = value(choice)
    missing = compression.zstd_missing() if codec == compression.ZSTD else None
    if missing:
        message = missing.replace("depth_codec 'zstd'", "--depth-codec zstd")  # the CLI names its option
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(EXIT_MISSING)
    return codec


def _client(target: Target, timeout: float, model: str | None, *, depth_codec: str = compression.NONE):
    """A client whose default model is ``model`` (None: the broker picks)."""
    from zdepth.client.sync import Client

    encoder, dataset = split_model_id(model)
    kwargs: dict[str, Any] = {"encoder": encoder, "depth_codec": depth_codec}
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

    from zdepth.client.inputs import count_frames

    counts = [count_frames(s, every) for s in sources]
    total = None if any(c is None for c in counts) else sum(counts)
    bar = Progress(
        TextColumn("depth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True
    )
    with bar:
        task = bar.add_task("depth", total=total)
        yield lambda n: bar.advance(task, n)



@command()
def health(
    ctx: typer.Context,
    server: Server = None,
    timeout: HealthTimeout = None,
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

    with errors():
        target = resolve_target(ctx, server, key=key, key_file=key_file, curve_secret=curve_secret, curve_server_key=curve_server_key, timeout=timeout)
        address = target.address
        wait = target.timeout or 5.0
        with explain_refusal(target.curve), Client(address, key=target.key, timeout=wait, retries=0, curve=target.curve) as client:
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
    depth_codec: DepthCodec = DepthCodecName.none,
    timeout: BenchTimeout = None,
    key: Key = None,
    key_file: KeyFile = None,
    curve_secret: ClientCurveSecret = None,
    curve_server_key: ClientCurveServerKey = None,
    json_out: JsonOut = False,
    log_level: LogLevel = None,
) -> None:
    """Load-test a server: N client streams for S seconds; frames per second, latency p50/p90/p99 and errors."""
    setup_logging(log_level)
    check_input_size(input_size)
    wire_format = value(wire_format)
    depth_codec = _depth_codec(depth_codec)
    from zdepth.client.bench import make_frames, run_bench

    with errors():
        target = resolve_target(
            ctx, server, key=key, key_file=key_file, curve_secret=curve_secret, curve_server_key=curve_server_key, timeout=timeout, model=model
        )
        address = target.address
        model = target.model
        timeout = target.timeout or 30.0
        if model is not None:
            check_models([model])
        frames = make_frames(image, parse_size(size, "--size"))
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
            depth_codec=depth_codec,
            timeout=timeout,
        )
    if json_out:
        typer.echo(json.dumps({"server": address, **report}, indent=2))
    else:
        typer.echo(format_bench(address, report))
    if report["frames"] == 0:
        raise typer.Exit(1)
