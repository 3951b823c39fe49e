"""The servers: ``broker``, ``worker`` and ``serve`` (a broker and one worker per GPU, supervised).

Each turns its options into ``zdepth.config`` dataclasses and hands them to the library; the
broker, worker and supervisor are looked up when the command runs (tests replace them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from zdepth.config import CLIENT_REPLY_HWM, MAX_CLIENT_BYTES, MAX_QUEUE_BYTES, read_key
from zdepth.config import Heartbeat as HeartbeatConfig
from zdepth.errors import ConfigError
from zdepth.exits import EXIT_ADDRESS, EXIT_INTERRUPTED
from zdepth.processes import report_ready
from zdepth.signals import on_stop_signals

from .common import address, errors, log_level_name, setup_logging
from .options import (
    DEVICE_METAVAR,
    BrokerCurveSecret,
    Clients,
    Compile,
    CudaGraphs,
    CurveAllow,
    Download,
    GpuDecode,
    Heartbeat,
    Key,
    KeyFile,
    Liveness,
    LogLevel,
    MaxBatch,
    MaxPixels,
    MaxWaitMs,
    MetricsPort,
    Models,
    Pipeline,
    Precision,
    Threads,
    Warmup,
    WeightsDir,
    WorkerCurveSecret,
    WorkerCurveServerKey,
    check_device,
    check_models,
    check_precision,
    parse_warmup,
    split,
)  # fmt: skip
from .root import command

logger = logging.getLogger("zdepth.cli")


def _limit(option: str, help: str, minimum: float = 1) -> typer.models.OptionInfo:
    """A numeric option whose variable follows the one rule (ZDEPTH_ and its name)."""
    return typer.Option(option, envvar="ZDEPTH_" + option[2:].upper().replace("-", "_"), min=minimum, help=help)


@command()
def broker(
    clients: Clients = "tcp://*:5555",
    workers: Annotated[str, typer.Option("--workers", envvar="ZDEPTH_WORKERS", help="Endpoint workers connect to.")] = "tcp://*:5556",
    key: Key = None,
    key_file: KeyFile = None,
    heartbeat: Heartbeat = 1.0,
    liveness: Liveness = 3,
    max_queue: Annotated[int, _limit("--max-queue", "Requests held (waiting, or at workers), all models, before 'overloaded'.")] = 1024,
    max_queue_bytes: Annotated[
        int, _limit("--max-queue-bytes", "Body bytes of the requests held, all clients together, before 'overloaded'.")
    ] = MAX_QUEUE_BYTES,
    max_client_bytes: Annotated[
        int, _limit("--max-client-bytes", "Body bytes of the requests held for one client connection before 'overloaded'.")
    ] = MAX_CLIENT_BYTES,
    client_reply_hwm: Annotated[
        int,
        _limit("--client-reply-hwm", "Unread replies queued for one client connection; a client that does not read loses its newest replies past it."),
    ] = CLIENT_REPLY_HWM,
    default_timeout: Annotated[float, _limit("--default-timeout", "Deadline in seconds for requests that name none.", 0.001)] = 30.0,
    drain_timeout: Annotated[float, _limit("--drain-timeout", "On stop, seconds to wait for replies in flight.", 0)] = 5.0,
    reconnect_grace: Annotated[
        float,
        _limit(
            "--reconnect-grace",
            "Seconds a request for a model with no worker waits, after start-up or after its last worker left, before 'unknown_model'.",
            0,
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
    with errors():
        clients = address(clients, "--clients", bind=True)
        workers = address(workers, "--workers", bind=True)
    import zmq

    from zdepth.broker import Broker
    from zdepth.config import BrokerConfig
    from zdepth.metrics import MetricsBindError
    from zdepth.protocol.curve import server_curve

    with errors():
        config = BrokerConfig(
            clients=clients,
            workers=workers,
            key=read_key(key, key_file),
            heartbeat=HeartbeatConfig(interval_s=heartbeat, liveness=liveness),
            max_queue=max_queue,
            max_queue_bytes=max_queue_bytes,
            max_client_bytes=max_client_bytes,
            client_reply_hwm=client_reply_hwm,
            default_timeout_s=default_timeout,
            drain_timeout_s=drain_timeout,
            reconnect_grace_s=reconnect_grace,
            curve=server_curve(curve_secret, curve_allow),
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
    code = exc.errno if isinstance(exc, zmq.ZMQError) else None
    hint = ""
    if code == errno.EADDRINUSE:
        hint = " (is another zdepth broker or `zdepth serve` running there? stop it, or choose other ports)"
    elif code in (errno.EADDRNOTAVAIL, errno.ENODEV):
        hint = " (no interface of this machine has that address; use * for every interface)"
    reason = zmq.strerror(code) if code else str(exc)
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
    model: Models = None,
    device: Annotated[
        str, typer.Option("--device", envvar="ZDEPTH_DEVICE", metavar=DEVICE_METAVAR, help="The device to run on; auto: cuda:0 if there is a GPU, else cpu.")
    ] = "auto",
    precision: Precision = None,
    weights_dir: WeightsDir = None,
    download: Download = False,
    max_batch: MaxBatch = None,
    threads: Threads = None,
    pipeline: Pipeline = True,
    max_pixels: MaxPixels = None,
    max_wait_ms: MaxWaitMs = 0.0,
    capacity: Annotated[
        int | None, typer.Option("--capacity", envvar="ZDEPTH_CAPACITY", min=1, help="Requests held at once. Default: 2 x max batch.", show_default=False)
    ] = None,
    compile: Compile = False,
    cuda_graphs: CudaGraphs = None,
    gpu_decode: GpuDecode = False,
    warmup: Warmup = None,
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
    models = split(model) or ["vits"]
    check_models(models)
    device = check_device(device)
    precision = check_precision(precision)
    sizes = parse_warmup(warmup)
    from zdepth.config import WorkerConfig
    from zdepth.protocol.curve import client_curve
    from zdepth.worker import run_worker

    with errors():
        given = split(broker) or split([os.environ.get("ZDEPTH_BROKERS", "")]) or ["tcp://localhost:5556"]
        brokers = [address(b, "--broker") for b in given]
        curve = client_curve(curve_secret, curve_server_key)
        _require_torch()
        _fetch_weights(models, weights_dir, download)
        device = _resolve_device(device)
        config = WorkerConfig(
            broker=",".join(brokers),
            models=tuple(models),
            key=read_key(key, key_file),
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
            **({} if sizes is None else {"warmup_sizes": sizes}),
        )
        code = run_worker(config)
    raise typer.Exit(code)


@command()
def serve(
    clients: Clients = "tcp://*:5555",
    workers: Annotated[
        str, typer.Option("--workers", envvar="ZDEPTH_WORKERS", help="Endpoint workers connect to (also for workers on other hosts).")
    ] = "tcp://*:5556",
    model: Models = None,
    device: Annotated[
        list[str] | None,
        typer.Option(
            "--device",
            envvar="ZDEPTH_DEVICE",
            metavar=DEVICE_METAVAR,
            help="Devices to start one worker each on (repeat, or a comma list). Default: every visible GPU, else up to 4 CPU workers sharing the cores.",
            show_default=False,
        ),
    ] = None,
    precision: Precision = None,
    max_batch: MaxBatch = None,
    threads: Threads = None,
    pipeline: Pipeline = True,
    max_pixels: MaxPixels = None,
    max_wait_ms: MaxWaitMs = 0.0,
    weights_dir: WeightsDir = None,
    download: Download = False,
    compile: Compile = False,
    cuda_graphs: CudaGraphs = None,
    gpu_decode: GpuDecode = False,
    warmup: Warmup = None,
    max_queue: Annotated[int, _limit("--max-queue", "Requests held (waiting, or at workers) before 'overloaded'.")] = 1024,
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
        float, _limit("--restart-delay", "Seconds before a crashed process is restarted (doubles while it keeps crashing).", 0)
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
    models = split(model) or ["vits"]
    check_models(models)
    precision = check_precision(precision)
    sizes = parse_warmup(warmup)
    devices = [check_device(d) for d in split(device)]
    from zdepth.config import BrokerConfig, WorkerConfig
    from zdepth.protocol.curve import serve_curves
    from zdepth.supervisor import Supervisor, detect_devices, serve_children
    from zdepth.worker.cpu import cpu_workers

    with errors():
        clients = address(clients, "--clients", bind=True)
        workers = address(workers, "--workers", bind=True)
        secret = read_key(key, key_file)
        broker_curve, worker_curve = serve_curves(curve_secret, curve_allow, curve_worker_secret)
        if not devices or devices == ["auto"]:
            devices = detect_devices()
            if devices == ["cpu"]:  # a CPU-only box: several workers use its cores better than one
                count, each = cpu_workers()
                devices, threads = ["cpu"] * count, threads or each
        _require_torch()
        _fetch_weights(models, weights_dir, download)  # once, here, rather than in every worker at once
        beat = HeartbeatConfig(interval_s=heartbeat, liveness=liveness)
        broker_config = BrokerConfig(
            clients=clients, workers=workers, key=secret, heartbeat=beat, max_queue=max_queue, curve=broker_curve, metrics_port=metrics_port
        )
        worker_config = WorkerConfig(
            models=tuple(models),
            key=secret,
            device=devices[0],
            precision=precision,
            weights_dir=str(weights_dir.expanduser().absolute()) if weights_dir else None,
            download=download,
            compile=compile,
            cuda_graphs=cuda_graphs,
            gpu_decode=gpu_decode,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            threads=threads,
            pipeline=pipeline,
            max_pixels=max_pixels,
            heartbeat=beat,
            curve=worker_curve,
            **({} if sizes is None else {"warmup_sizes": sizes}),
        )
        children = serve_children(broker_config, worker_config, devices, log_level=log_level_name(log_level))
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

    from zdepth.engine.inference import resolve_device

    device = resolve_device(device)
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
