"""``zdepth serve``'s machinery: find the GPUs, start a broker and workers, keep them running.

Children are real processes (``python -m zdepth broker|worker ...``), each in
its own process group so that a Ctrl-C in the terminal reaches only the
supervisor, which then stops them in order: workers first (they drain, so
requests in flight are answered while the broker is still up), then the
broker. A child that exits on its own is logged and restarted after a
back-off that doubles while it keeps crashing. On Linux every child also gets
SIGTERM if the supervisor dies, so no orphan keeps a GPU or a port.

Keys travel in the environment (``ZDEPTH_KEY``), never on a command line
where ``ps`` would show them; CurveZMQ certificates travel as file paths on
the command line (the files hold the keys). Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ChildSpec", "Supervisor", "connect_address", "detect_devices"]

logger = logging.getLogger(__name__)

POLL_S = 0.1


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


@dataclass
class ChildSpec:
    """One supervised process: a name for logs, its argv, extra environment (None removes a variable)."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str | None] = field(default_factory=dict)
    stop_timeout_s: float = 10.0  # SIGTERM, then this long, then SIGKILL


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive short-lived runs, for the back-off
    restart_at: float | None = None


class Supervisor:
    """Start ``children`` in order and keep them running until ``stop()``; then stop them in reverse order.

    ``run()`` blocks (call it from the main thread: children's death signal
    is tied to it); ``stop()`` may be called from a signal handler or any
    thread. A child that exits is restarted after ``restart_delay_s``,
    doubling up to ``max_restart_delay_s`` while it keeps dying within
    ``stable_after_s`` of its start.
    """

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        restart_delay_s: float = 1.0,
        max_restart_delay_s: float = 30.0,
        stable_after_s: float = 60.0,
        on_start: Callable[[ChildSpec, subprocess.Popen], None] | None = None,
    ) -> None:
        self._children = [_Child(spec) for spec in children]
        self.restart_delay_s = restart_delay_s
        self.max_restart_delay_s = max_restart_delay_s
        self.stable_after_s = stable_after_s
        self._on_start = on_start
        self._stop = threading.Event()

    @property
    def pids(self) -> dict[str, int | None]:
        return {c.spec.name: c.process.pid if c.process and c.process.poll() is None else None for c in self._children}

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            for child in self._children:
                if self._stop.is_set():
                    break
                self._start(child)
            while not self._stop.wait(POLL_S):
                self._check(time.monotonic())
        finally:
            self._stop_all()

    def _start(self, child: _Child) -> None:
        env = {**os.environ, **child.spec.env}
        env = {name: value for name, value in env.items() if value is not None}
        env["PYTHONPATH"] = _pythonpath(env.get("PYTHONPATH"))
        # preexec_fn runs between fork and exec; _die_with_parent only calls prctl, which is safe there.
        child.process = subprocess.Popen(list(child.spec.argv), env=env, start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
        child.started = time.monotonic()
        child.restart_at = None
        logger.info("started %s (pid %d)", child.spec.name, child.process.pid)
        if self._on_start is not None:
            self._on_start(child.spec, child.process)

    def _check(self, now: float) -> None:
        for child in self._children:
            if child.process is None or child.restart_at is not None:
                if child.restart_at is not None and now >= child.restart_at:
                    child.restarts += 1
                    self._start(child)
                continue
            code = child.process.poll()
            if code is None:
                continue
            lived = now - child.started
            child.failures = child.failures + 1 if lived < self.stable_after_s else 1
            delay = min(self.max_restart_delay_s, self.restart_delay_s * 2 ** (child.failures - 1))
            logger.error(
                "%s (pid %d) %s after %.1f s; restarting in %.1f s",
                child.spec.name, child.process.pid, describe_exit(code), lived, delay,
            )  # fmt: skip
            child.restart_at = now + delay

    def _stop_all(self) -> None:
        """SIGTERM in reverse start order (workers drain before the broker goes), SIGKILL whoever lingers."""
        for child in reversed(self._children):
            process = child.process
            if process is None or process.poll() is not None:
                continue
            logger.info("stopping %s (pid %d)", child.spec.name, process.pid)
            _signal(process, signal.SIGTERM)
            try:
                process.wait(timeout=child.spec.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) did not stop in %.0f s; killing it", child.spec.name, process.pid, child.spec.stop_timeout_s)
                _signal(process, signal.SIGKILL)
                process.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: no more patience
                for other in self._children:
                    if other.process is not None and other.process.poll() is None:
                        _signal(other.process, signal.SIGKILL)
                        other.process.wait()
                raise
        logger.info("all children stopped")


def _pythonpath(current: str | None) -> str:
    """So that ``python -m zdepth`` in a child finds this very zdepth, installed or run from a checkout."""
    here = str(Path(__file__).resolve().parents[1])
    parts = [p for p in (current or "").split(os.pathsep) if p]
    if here in parts or Path(here).name in ("site-packages", "dist-packages"):
        return os.pathsep.join(parts)
    return os.pathsep.join([here, *parts])


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _signal(process: subprocess.Popen, sig: int) -> None:
    try:
        process.send_signal(sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux only: the child gets SIGTERM when the supervisor dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no libc or no prctl: the child simply outlives a killed supervisor
        return
