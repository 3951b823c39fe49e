"""``zdepth serve``'s machinery: find the GPUs, start a broker and workers, keep them running.

This module decides what serve runs (devices, the children's command lines);
``zdepth.processes`` runs them (``Supervisor``, ``ChildSpec``) and
``zdepth.exits`` holds the exit statuses. The names of both are importable here.

Children are real processes (``python -m zdepth broker|worker ...``), each in
its own process group so that a Ctrl-C in the terminal reaches only the
supervisor. They start group by group: the broker first, and the workers only
once it has reported the endpoints it actually bound (on a pipe, see
``READY_FD_ENV``), so a worker never joins some other broker that already
holds the port. They stop the other way round: all workers at once (they
drain, so requests in flight are answered while the broker is still up), then
the broker. On Linux every child also gets SIGTERM if the supervisor dies, so
no orphan keeps a GPU or a port.

Exit statuses tell a crash from a permanent error (the same for every
``zdepth`` command): a child that exits with one of ``PERMANENT_EXITS`` (a bad
setting, a missing checkpoint or torch, an address that cannot be bound) is
not restarted; the supervisor stops everything and returns that status. Any
other exit is a crash: the child is restarted after a back-off with jitter
that doubles while it keeps dying young, up to ``max_failures`` times in a
row.

The children's command lines are built here from the same config
dataclasses the commands build (``broker_argv``, ``worker_argv``), so a
child runs with exactly the settings serve was given. Keys travel in the
environment (``ZDEPTH_KEY``), never on a command line where ``ps`` would show
them; CurveZMQ certificates travel as file paths on the command line (the
files hold the keys). Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from zdepth.config import BrokerConfig, WorkerConfig
from zdepth.errors import ConfigError
from zdepth.exits import (  # every command's exit statuses, long imported from here
    EXIT_ADDRESS,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_MISSING,
    EXIT_OK,
    PERMANENT_EXITS,
    describe_exit,
)
from zdepth.processes import READY_FD_ENV, ChildSpec, Supervisor, report_ready

__all__ = [
    "EXIT_ADDRESS",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_MISSING",
    "EXIT_OK",
    "PERMANENT_EXITS",
    "READY_FD_ENV",
    "ChildSpec",
    "Supervisor",
    "broker_argv",
    "connect_address",
    "describe_exit",
    "detect_devices",
    "report_ready",
    "serve_children",
    "worker_argv",
]

logger = logging.getLogger(__name__)



def detect_devices(*, timeout_s: float = 30.0) -> list[str]:
    """``cuda:N`` for each visible GPU, or ``["cpu"]`` when there is none.

    Honours ``CUDA_VISIBLE_DEVICES``; asks ``nvidia-smi -L`` and, only when that
    is not installed, torch in a subprocess (this process never imports torch).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        # CUDA stops at the first invalid entry; "-1" is the usual way to hide every GPU.
        for i, entry in enumerate(entries):
            if entry.startswith("-"):
                entries = entries[:i]
                break
        if not entries:
            return ["cpu"]
    count = _count_nvidia_smi(timeout_s)
    if count is None:
        count = _count_torch(timeout_s)  # torch applies CUDA_VISIBLE_DEVICES itself
    elif visible is not None:
        count = min(count, len(entries))
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def _count_nvidia_smi(timeout_s: float) -> int | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("nvidia-smi -L failed (%s); assuming no GPU", exc)
        return 0
    if out.returncode != 0:
        logger.info("nvidia-smi -L exited with %d (%s); assuming no GPU", out.returncode, out.stderr.strip())
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _count_torch(timeout_s: float) -> int:
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, check=False)
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def connect_address(bind: str) -> str:
    """The address a local process connects to for a bind endpoint (``tcp://*:5556`` -> ``tcp://127.0.0.1:5556``)."""
    if not bind.startswith("tcp://"):
        return bind  # ipc://, inproc:// connect as they bind
    host, sep, port = bind[len("tcp://") :].rpartition(":")
    if host in ("*", "0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"tcp://{host}{sep}{port}"


# ----------------------------------------------------------------------------- serve's children

PYTHON = (sys.executable, "-m", "zdepth")
# Children get every CurveZMQ setting, and their own metrics port, on their command line (paths and
# numbers only), never from an environment they would share.
CHILD_UNSET_ENVS = ("ZDEPTH_CURVE_SECRET", "ZDEPTH_CURVE_ALLOW", "ZDEPTH_CURVE_SERVER_KEY", "ZDEPTH_CURVE_WORKER_SECRET", "ZDEPTH_METRICS_PORT")
# Settings the commands have no option for: a config that changes them cannot become a command line.
_BROKER_FIXED = ("max_message_bytes",)
_WORKER_FIXED = ("reconnect_min_s", "reconnect_max_s", "max_message_bytes", "max_held_bytes", "summary_interval_s")
# Broker limits `serve` has no option for: written only when changed, so that their ZDEPTH_* variables
# still reach serve's broker, as they always have.
_BROKER_LIMITS = (
    ("max_queue_bytes", "--max-queue-bytes"),
    ("max_client_bytes", "--max-client-bytes"),
    ("client_reply_hwm", "--client-reply-hwm"),
    ("default_timeout_s", "--default-timeout"),
    ("drain_timeout_s", "--drain-timeout"),
    ("reconnect_grace_s", "--reconnect-grace"),
)


def _check_expressible(config: Any, fixed: Sequence[str]) -> None:
    """ValueError for a setting that only Python can give (the key travels in the environment, not here)."""
    default = type(config)()
    changed = [name for name in fixed if getattr(config, name) != getattr(default, name)]
    if changed:
        raise ValueError(f"{', '.join(changed)} cannot be set on a command line; keep the defaults")


def _common_argv(heartbeat: Any, log_level: str | None) -> list[str]:
    argv = ["--heartbeat", str(heartbeat.interval_s), "--liveness", str(heartbeat.liveness)]
    return argv + ["--log-level", log_level] if log_level else argv


def broker_argv(config: BrokerConfig, *, log_level: str | None = None) -> list[str]:
    """``python -m zdepth broker ...`` that runs with ``config`` (``config.key`` goes in ZDEPTH_KEY instead)."""
    _check_expressible(config, _BROKER_FIXED)
    argv = [*PYTHON, "broker", "--clients", config.clients, "--workers", config.workers, "--max-queue", str(config.max_queue)]
    default = BrokerConfig()
    for name, option in _BROKER_LIMITS:
        if getattr(config, name) != getattr(default, name):
            argv += [option, str(getattr(config, name))]
    if config.curve is not None:
        argv += ["--curve-secret", str(config.curve.secret_file)]
        if config.curve.allow_dir is not None:
            argv += ["--curve-allow", str(config.curve.allow_dir)]
    if config.metrics_port is not None:
        argv += ["--metrics-port", str(config.metrics_port)]
    return argv + _common_argv(config.heartbeat, log_level)


def worker_argv(config: WorkerConfig, *, log_level: str | None = None) -> list[str]:
    """``python -m zdepth worker ...`` that runs with ``config`` (``config.key`` goes in ZDEPTH_KEY instead).

    Unset optional settings are left out, so the worker command's own defaults (and variables) apply.
    """
    _check_expressible(config, _WORKER_FIXED)
    argv = [*PYTHON, "worker", "--broker", config.broker, "--device", config.device]
    argv += ["--max-wait-ms", str(config.max_wait_ms), "--pipeline" if config.pipeline else "--no-pipeline"]
    for name in ("max_batch", "capacity", "threads", "max_pixels", "precision", "weights_dir", "metrics_port"):
        if getattr(config, name) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    if config.curve is not None:
        argv += ["--curve-secret", str(config.curve.secret_file), "--curve-server-key", str(config.curve.server_public_file)]
    for model in config.models:
        argv += ["--model", model]
    argv += ["--download" if config.download else "--no-download", "--compile" if config.compile else "--no-compile"]
    if config.cuda_graphs is not None:
        argv.append("--cuda-graphs" if config.cuda_graphs else "--no-cuda-graphs")
    argv.append("--gpu-decode" if config.gpu_decode else "--no-gpu-decode")
    argv += ["--warmup", ",".join(f"{h}x{w}" for h, w in config.warmup_sizes) or "none"]
    return argv + _common_argv(config.heartbeat, log_level)


def serve_children(broker: BrokerConfig, worker: WorkerConfig, devices: Sequence[str], *, log_level: str | None = None) -> list[ChildSpec]:
    """``zdepth serve``'s broker and one worker per device, from the broker's config and one for every worker.

    The broker reports the endpoints it bound: after a first start on port ``*`` a restart binds the
    ports the first one got (which the workers know), and the workers connect to the reported endpoint,
    never to whatever else listens there. With ``broker.metrics_port`` P the workers take P+1, P+2, ...
    in device order (0: any free port each). The key travels in ZDEPTH_KEY, never on a command line.
    """
    port = broker.metrics_port
    if port and port + len(devices) > 65535:
        raise ConfigError(f"--metrics-port {port} leaves no port for {len(devices)} workers (they take the next ports)")
    env: dict[str, str | None] = {name: None for name in CHILD_UNSET_ENVS}
    if broker.key:
        env["ZDEPTH_KEY"] = broker.key

    def broker_start(ready: Mapping[str, Mapping[str, Any]]) -> list[str]:
        bound = ready.get("broker") or {}
        given = {"clients": broker.clients, "workers": broker.workers}
        endpoints = {name: bound[name] if bound.get(name) and at.endswith(":*") else at for name, at in given.items()}
        return broker_argv(replace(broker, **endpoints), log_level=log_level)

    def worker_start(device: str, index: int) -> Callable[[Mapping[str, Mapping[str, Any]]], list[str]]:
        own = None if port is None else (port + 1 + index if port else 0)

        def argv(ready: Mapping[str, Mapping[str, Any]]) -> list[str]:
            endpoint = connect_address(ready["broker"]["workers"])
            return worker_argv(replace(worker, broker=endpoint, device=device, metrics_port=own), log_level=log_level)

        return argv

    children = [ChildSpec("broker", broker_start, env, stop_timeout_s=15.0, group=0, ready=True)]
    for i, dev in enumerate(devices):
        name = f"worker {dev}" if devices.count(dev) == 1 else f"worker {dev} #{devices[:i].count(dev) + 1}"  # several CPU workers
        children.append(ChildSpec(name, worker_start(dev, i), env, stop_timeout_s=30.0, group=1))
    return children
