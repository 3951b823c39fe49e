"""The process group behind ``zdepth serve``: start children group by group, restart the ones that
crash, stop them all.

Children are real processes, each in its own process group so that a Ctrl-C in
the terminal reaches only the supervisor. They start group by group: a group
starts once every ``ready`` child of the earlier ones has reported (on a pipe,
see ``READY_FD_ENV``), so a worker never joins some other broker that already
holds the port. They stop the other way round, a group's children all at once.
On Linux every child also gets SIGTERM if the supervisor dies, so no orphan
keeps a GPU or a port. A child that exits with one of ``PERMANENT_EXITS`` is not
restarted; any other exit is a crash, restarted after a jittered back-off that
doubles while it keeps dying young, up to ``max_failures`` times in a row.
"""

from __future__ import annotations

import json
import logging
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zdepth.backoff import backoff_delay
from zdepth.exits import EXIT_FAILURE, EXIT_OK, PERMANENT_EXITS, describe_exit

logger = logging.getLogger("zdepth.supervisor")

POLL_S = 0.1

# A child started with ``ChildSpec(ready=True)`` finds a pipe's file descriptor here and writes
# one JSON object to it once it is up (the broker: the endpoints it bound).
READY_FD_ENV = "ZDEPTH_READY_FD"


def report_ready(info: Mapping[str, Any]) -> None:
    """In a supervised child: tell the supervisor we are up (no-op when not started with ``ready=True``)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if not fd:
        return
    try:
        with os.fdopen(int(fd), "w") as pipe:
            pipe.write(json.dumps(dict(info)) + "\n")
    except (OSError, ValueError) as exc:
        logger.warning("could not report readiness on fd %s: %s", fd, exc)


Argv = Sequence[str] | Callable[[Mapping[str, Mapping[str, Any]]], Sequence[str]]


@dataclass
class ChildSpec:
    """One supervised process.

    ``argv`` is a list, or a function of what the ``ready`` children reported so far
    (by name; empty before they did), called at every (re)start. ``env``: extra
    environment (None removes a variable). Children start by ascending ``group``,
    each group once every ``ready`` child of the earlier ones has reported, and
    stop by descending ``group``, a group's children all at once.
    """

    name: str
    argv: Argv
    env: Mapping[str, str | None] = field(default_factory=dict)
    stop_timeout_s: float = 10.0  # SIGTERM, then this long, then SIGKILL
    group: int = 0
    ready: bool = False  # reports readiness on the pipe in $ZDEPTH_READY_FD


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive short-lived runs, for the back-off
    restart_at: float | None = None
    ready_pipe: int | None = None  # read end, until the child reported or closed it
    reported: bool = False  # this run of a ``ready`` child has reported


class Supervisor:
    """Start ``children`` group by group and keep them running until ``stop()``; ``run()`` returns the exit status.

    ``run()`` blocks (call it from the main thread: children's death signal
    is tied to it); ``stop()`` may be called from a signal handler or any
    thread. A child that exits with a status in ``PERMANENT_EXITS`` stops
    everything, and ``run()`` returns that status. Any other exit is a crash:
    the child is restarted after a random delay between half and all of
    ``restart_delay_s * 2**(n-1)`` (capped at ``max_restart_delay_s``) for its
    n-th crash in a row within ``stable_after_s`` of its start; after
    ``max_failures`` such crashes in a row, ``run()`` gives up with
    EXIT_FAILURE. A ``ready`` child that has not reported within
    ``ready_timeout_s`` counts as crashed.
    """

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        restart_delay_s: float = 1.0,
        max_restart_delay_s: float = 30.0,
        stable_after_s: float = 60.0,
        max_failures: int | None = 8,
        ready_timeout_s: float = 60.0,
        on_start: Callable[[ChildSpec, subprocess.Popen], None] | None = None,
        rand: random.Random | None = None,
    ) -> None:
        self._children = [_Child(spec) for spec in children]
        self.restart_delay_s = restart_delay_s
        self.max_restart_delay_s = max_restart_delay_s
        self.stable_after_s = stable_after_s
        self.max_failures = max_failures
        self.ready_timeout_s = ready_timeout_s
        self._on_start = on_start
        self._rand = rand or random.Random()
        self._stop = threading.Event()
        self.ready: dict[str, dict[str, Any]] = {}  # what each ready child reported, by name
        self.failure: str | None = None  # why run() returned non-zero, for the caller's message

    @property
    def pids(self) -> dict[str, int | None]:
        return {c.spec.name: c.process.pid if c.process and c.process.poll() is None else None for c in self._children}

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        try:
            for group in sorted({c.spec.group for c in self._children}):
                members = [c for c in self._children if c.spec.group == group]
                for child in members:
                    if self._stop.is_set():
                        return EXIT_OK
                    self._start(child)
                # The next group starts only once this one's ready children have reported.
                while any(not c.reported for c in members if c.spec.ready):
                    if self._stop.is_set():
                        return EXIT_OK
                    code = self._tick()
                    if code is not None:
                        return code
            while not self._stop.is_set():
                code = self._tick()
                if code is not None:
                    return code
            return EXIT_OK
        finally:
            self._stop_all()

    def _tick(self) -> int | None:
        """Wait up to POLL_S for reports, then check on every child; a status when run() must end."""
        pipes = [c.ready_pipe for c in self._children if c.ready_pipe is not None]
        if pipes:
            readable = select.select(pipes, [], [], POLL_S)[0]
            for child in self._children:
                if child.ready_pipe is not None and child.ready_pipe in readable:
                    self._read_ready(child)
        else:
            self._stop.wait(POLL_S)
        now = time.monotonic()
        for child in self._children:
            waiting = child.spec.ready and not child.reported and child.process is not None and child.restart_at is None
            if waiting and now - child.started > self.ready_timeout_s and child.process.poll() is None:
                logger.error("%s did not report ready within %.0f s; killing it", child.spec.name, self.ready_timeout_s)
                _signal(child.process, signal.SIGKILL)
                child.process.wait()
        return self._check(now)

    def _start(self, child: _Child) -> None:
        env = {**os.environ, **child.spec.env}
        env = {name: value for name, value in env.items() if value is not None and name != READY_FD_ENV}
        env["PYTHONPATH"] = _pythonpath(env.get("PYTHONPATH"))
        argv = child.spec.argv(self.ready) if callable(child.spec.argv) else child.spec.argv
        pass_fds: tuple[int, ...] = ()
        write_end = None
        if child.spec.ready:
            self._close_pipe(child)
            child.ready_pipe, write_end = os.pipe()
            env[READY_FD_ENV] = str(write_end)
            pass_fds = (write_end,)
        try:
            # preexec_fn runs between fork and exec; _die_with_parent only calls prctl, which is safe there.
            child.process = subprocess.Popen(  # noqa: PLW1509
                list(argv), env=env, start_new_session=True, preexec_fn=_die_with_parent, pass_fds=pass_fds
            )
        finally:
            if write_end is not None:
                os.close(write_end)  # the child holds its own copy: EOF here once it exits
        child.started = time.monotonic()
        child.restart_at = None
        child.reported = False
        logger.info("started %s (pid %d)", child.spec.name, child.process.pid)
        if self._on_start is not None:
            self._on_start(child.spec, child.process)

    def _read_ready(self, child: _Child) -> None:
        """The child's report, or nothing yet at EOF (it exited: _check deals with that)."""
        data = b""
        while not data.endswith(b"\n") and (chunk := os.read(child.ready_pipe, 65536)):
            data += chunk
        self._close_pipe(child)
        if not data:
            return
        try:
            info = json.loads(data)
        except ValueError:
            info = {}
        self.ready[child.spec.name] = info if isinstance(info, dict) else {}
        child.reported = True
        logger.info("%s is up%s", child.spec.name, "".join(f", {k} {v}" for k, v in sorted(self.ready[child.spec.name].items())))

    @staticmethod
    def _close_pipe(child: _Child) -> None:
        if child.ready_pipe is not None:
            os.close(child.ready_pipe)
            child.ready_pipe = None

    def _check(self, now: float) -> int | None:
        """Restart what is due, notice exits; a status when run() must end."""
        for child in self._children:
            if child.process is None or child.restart_at is not None:
                if child.restart_at is not None and now >= child.restart_at:
                    child.restarts += 1
                    self._start(child)
                continue
            code = child.process.poll()
            if code is None:
                continue
            if child.ready_pipe is not None:  # it may have reported just before it died
                self._read_ready(child)
            lived = now - child.started
            what = f"{child.spec.name} (pid {child.process.pid}) {describe_exit(code)} after {lived:.1f} s"
            if code in PERMANENT_EXITS:
                self.failure = f"{what}: {PERMANENT_EXITS[code]}; restarting cannot help, so everything stops (its error is above)"
                logger.error("%s", self.failure)
                return code
            child.failures = child.failures + 1 if lived < self.stable_after_s else 1
            if self.max_failures is not None and child.failures >= self.max_failures:
                self.failure = f"{what}, its {child.failures}th failure in a row within {self.stable_after_s:.0f} s of starting; giving up"
                logger.error("%s", self.failure)
                return EXIT_FAILURE
            delay = self.backoff(child.failures)
            logger.error("%s; restarting in %.1f s", what, delay)
            child.restart_at = now + delay
        return None

    def backoff(self, failures: int) -> float:
        """Seconds before a restart after ``failures`` crashes in a row: jittered, so children do not restart in step."""
        # Half the first delay as the base: the first restart already draws from [delay / 2, delay].
        return backoff_delay(failures, self.restart_delay_s / 2, self.max_restart_delay_s, rand=self._rand)

    def _stop_all(self) -> None:
        """By descending group: SIGTERM a group's children all at once, wait for them, SIGKILL whoever lingers."""
        for group in sorted({c.spec.group for c in self._children}, reverse=True):
            running = [c for c in self._children if c.spec.group == group and c.process is not None and c.process.poll() is None]
            for child in running:
                logger.info("stopping %s (pid %d)", child.spec.name, child.process.pid)
                _signal(child.process, signal.SIGTERM)
            try:
                self._wait_all(running)
            except KeyboardInterrupt:  # a second Ctrl-C: no more patience
                for other in self._children:
                    if other.process is not None and other.process.poll() is None:
                        _signal(other.process, signal.SIGKILL)
                        other.process.wait()
                raise
        for child in self._children:
            self._close_pipe(child)
        logger.info("all children stopped")

    @staticmethod
    def _wait_all(running: list[_Child]) -> None:
        """Wait for children SIGTERMed together, each up to its own stop timeout; SIGKILL the late ones."""
        start = time.monotonic()
        for child in running:
            left = child.spec.stop_timeout_s - (time.monotonic() - start)
            try:
                child.process.wait(timeout=max(0.0, left))
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) did not stop in %.0f s; killing it", child.spec.name, child.process.pid, child.spec.stop_timeout_s)
                _signal(child.process, signal.SIGKILL)
                child.process.wait()


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


def _pythonpath(current: str | None) -> str:
    """So that ``python -m zdepth`` in a child finds this very zdepth, installed or run from a checkout."""
    here = str(Path(__file__).resolve().parents[1])
    parts = [p for p in (current or "").split(os.pathsep) if p]
    if here in parts or Path(here).name in ("site-packages", "dist-packages"):
        return os.pathsep.join(parts)
    return os.pathsep.join([here, *parts])
