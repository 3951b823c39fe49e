"""Soak: several clients and workers for a few minutes while processes die under them.

A real broker and ``--workers`` CPU workers (``python -m zdepth``
subprocesses), ``--clients`` client threads each with its own
``zdepth.Client`` (retries on) sending small frames one after another. Every
``--kill-every`` seconds ``--kill-together`` workers (one by default) are
killed with SIGKILL at once and fresh ones started in their place (a GPU host
with several GPUs that crashes); with ``--freeze SECONDS`` they are instead
stopped with SIGSTOP and resumed with SIGCONT that much later (a host
suspended for a moment). Once, half way through, the broker itself is killed
with SIGKILL and restarted on the same ports (``--broker-restart-at 0``: never).
The run stops by itself after ``--minutes``.

Every call's outcome is recorded, and the report says:

- ``sent``: calls made; ``ok``: results; one column per error code that a
  server answered with (``worker_lost``, ``overloaded``, ...);
- ``worker_lost while a worker lived``: the ``worker_lost`` answers to calls
  during all of which at least one worker was up (registered, not killed or
  stopped). A dead worker's requests go to a live one, so this must be 0: the
  run exits 1 otherwise;
- ``no_reply`` (the *unanswered*): calls that got no reply at all, to any of
  their attempts, and so raised the client's own DeadlineExceeded. It must be
  0: the run exits 1 otherwise;
- ``retried``: calls answered only after a resend, because the reply to an
  earlier attempt was lost (a broker killed while holding the request);
  ``attempts_lost`` counts those lost attempts. A retry is what the client
  does by design, so these are answered, but they are reported, not hidden;
- latency p50/p90/p99 of the successful calls (retries included) per
  ``--window`` seconds, with what happened in each window;
- the RSS (VmRSS) of every process at its start and at its end (a killed
  worker's end is just before its kill).

    python benchmarks/soak.py [--minutes 3] [--clients 4] [--workers 2] [--kill-every 20] [--json out.json]
    python benchmarks/soak.py --minutes 2 --workers 3 --kill-together 2 --broker-restart-at 0   # two of three at once
    python benchmarks/soak.py --minutes 2 --workers 3 --kill-together 2 --freeze 4 --broker-restart-at 0

``fuzz.py`` reuses the process helpers below.
"""

from __future__ import annotations

import collections
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
from zdepth.testing import free_port, rss_mb

NAME = "soak"
KEY = "soak-key"
CHAOS_MARGIN_S = 10.0  # no kill this close to the end: a replacement registers (and is measured) before the end
ROOT = _common.ROOT


# ----------------------------------------------------------------------------- processes (shared with fuzz.py)


def child_env(weights_dir: Path | str | None, key: str | None) -> dict[str, str]:
    """This checkout importable, no stray ZDEPTH_* settings or profiles, one torch thread, the key in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDEPTH_")}
    env["PYTHONPATH"] = _common.checkout_pythonpath()
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["ZDEPTH_CONFIG"] = str(Path(tempfile.gettempdir()) / "zdepth-no-profiles.toml")
    if weights_dir is not None:
        env["ZDEPTH_WEIGHTS_DIR"] = str(weights_dir)
    if key is not None:
        env["ZDEPTH_KEY"] = key
    return env


@dataclass
class Child:
    """A ``python -m zdepth ...`` subprocess with its log file and RSS at start and end."""

    role: str
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    popen: subprocess.Popen | None = None
    started: float = 0.0
    rss_start: float | None = None
    rss_end: float | None = None
    ended: str = "running"
    exit_code: int | None = None
    cwd: Path = ROOT

    def start(self) -> Child:
        with open(self.log, "ab") as handle:
            self.popen = subprocess.Popen(self.argv, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        self.started = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def rss(self) -> float | None:
        return rss_mb(self.pid) if self.alive() else None

    def mark_start(self) -> None:
        self.rss_start = self.rss()

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 20.0, how: str | None = None) -> int | None:
        """Signal, wait (then SIGKILL); records the RSS just before and how it ended."""
        if self.popen is None:
            return None
        if self.alive():
            self.rss_end = self.rss()
            self.ended = how or signal.Signals(sig).name
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.ended += ", then SIGKILL"
                self.popen.kill()
                self.popen.wait(10)
        elif self.ended == "running":
            self.ended = "exited by itself"
        self.exit_code = self.popen.returncode
        return self.exit_code

    def kill_now(self, how: str) -> None:
        """SIGKILL without waiting (``reap`` waits), so several processes die at the same moment."""
        if self.alive():
            self.rss_end = self.rss()
            self.ended = how
            self.popen.send_signal(signal.SIGKILL)

    def reap(self) -> None:
        if self.popen is not None:
            self.popen.wait(10)
            self.exit_code = self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def row(self) -> dict[str, Any]:
        growth = None if self.rss_start is None or self.rss_end is None else self.rss_end - self.rss_start
        pid = self.popen.pid if self.popen else None
        return {"process": self.name, "role": self.role, "pid": pid, "rss_start_mb": self.rss_start, "rss_end_mb": self.rss_end, "growth_mb": growth, "ended": self.ended, "exit": self.exit_code}


def zdepth_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "zdepth", *args]


def broker_child(name: str, clients: str, workers: str, logs: Path, env: dict[str, str], *extra: str) -> Child:
    return Child("broker", name, zdepth_argv("broker", "--clients", clients, "--workers", workers, *extra), logs / f"{name}.log", env)


def worker_child(name: str, workers: str, logs: Path, env: dict[str, str], models: tuple[str, ...], *extra: str) -> Child:
    model_args = [arg for model in models for arg in ("--model", model)]
    argv = zdepth_argv("worker", "--broker", workers, "--device", "cpu", *model_args, "--warmup", "none", *extra)
    return Child("worker", name, argv, logs / f"{name}.log", env)


def wait_health(address: str, key: str | None, *, workers: int, timeout: float = 120.0, children: tuple[Child, ...] = (), exclude_pids=()) -> dict:
    """Poll health until ``workers`` non-draining workers (not in ``exclude_pids``) are registered."""
    from zdepth import Client, ZdepthError

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for child in children:
            if child.popen is not None and child.popen.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.popen.returncode}:\n{child.tail()}")
        try:
            with Client(address, key=key, timeout=2.0, retries=0) as client:
                last = client.health()
        except ZdepthError as exc:
            last = exc
        else:
            ready = [w for w in last.get("workers", []) if not w.get("draining") and w.get("pid") not in exclude_pids]
            if len(ready) >= workers:
                return last
        time.sleep(0.2)
    raise RuntimeError(f"no {workers} worker(s) ready at {address} within {timeout:.0f} s (last: {last!r})")


def small_frame(height: int = 64, width: int = 96):
    """A small photo-like BGR frame (a test photo resized, or a synthetic one)."""
    return _common.frames_bgr(1, (height, width))[0]


# ----------------------------------------------------------------------------- clients


@dataclass
class Outcome:
    started: float  # time.monotonic()
    ended: float
    status: str  # "ok", an error code answered by a server, "no_reply", or "exception"
    attempts: int
    detail: str = ""

    @property
    def latency_ms(self) -> float:
        return (self.ended - self.started) * 1000


def counting_client_class():
    from zdepth import Client

    class CountingClient(Client):
        """A Client that remembers how many attempts its last call took (each resend is one more)."""

        last_attempts = 0

        def _send(self, exchange) -> None:  # exchange: zdepth.client.pipeline.Exchange
            super()._send(exchange)
            self.last_attempts = exchange.attempts

    return CountingClient


class ClientThread(threading.Thread):
    """Calls one after another until stopped, alternating relative and metric depth; records every outcome."""

    def __init__(self, index: int, address: str, frame, *, timeout: float, retries: int, input_size: int, stop: threading.Event) -> None:
        super().__init__(name=f"soak-client-{index}", daemon=True)
        self.address, self.frame, self.stop_event = address, frame, stop
        self.options = {"key": KEY, "timeout": timeout, "retries": retries, "input_size": input_size}
        self.outcomes: list[Outcome] = []
        self.index = index

    def run(self) -> None:
        from zdepth import DeadlineExceeded, ServiceError

        client = counting_client_class()(self.address, **self.options)
        calls = 0
        try:
            while not self.stop_event.is_set():
                calls += 1
                started = time.monotonic()
                status, detail = "ok", ""
                try:
                    if calls % 2:
                        client.relative_depth(self.frame)
                    else:
                        client.metric_depth(self.frame)
                except DeadlineExceeded as exc:
                    # The client's own deadline (no reply to any attempt) carries its attempts in details;
                    # a broker's or worker's "timeout" reply does not.
                    status = "no_reply" if "attempts" in exc.details else "timeout"
                    detail = str(exc)
                except ServiceError as exc:
                    status, detail = exc.code, str(exc)
                except Exception as exc:  # a bug: reported as such
                    status, detail = "exception", f"{type(exc).__name__}: {exc}"
                self.outcomes.append(Outcome(started, time.monotonic(), status, client.last_attempts, detail))
        finally:
            client.close()


# ----------------------------------------------------------------------------- the run


@dataclass
class Soak:
    args: Any
    logs: Path
    weights_dir: Path
    clients_address: str = field(init=False)
    workers_address: str = field(init=False)
    children: list[Child] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    t0: float = 0.0

    def __post_init__(self) -> None:
        self.clients_address = f"tcp://127.0.0.1:{free_port()}"
        self.workers_address = f"tcp://127.0.0.1:{free_port()}"
        self.env = child_env(self.weights_dir, KEY)
        self.worker_generation = 0
        self.broker_generation = 0
        self.up: set[int] = set()  # pids of workers registered and neither killed nor stopped
        self.up_log: list[tuple[float, int]] = []  # (time.monotonic(), len(self.up)) at every change

    def mark_up(self, pid: int, up: bool) -> None:
        (self.up.add if up else self.up.discard)(pid)
        self.up_log.append((time.monotonic(), len(self.up)))

    def fewest_up(self, start: float, end: float) -> int:
        """The fewest workers up at any moment of [start, end]."""
        before = [n for t, n in self.up_log if t <= start]
        during = [n for t, n in self.up_log if start < t <= end]
        return min([before[-1] if before else 0, *during])

    def event(self, text: str) -> None:
        stamp = time.monotonic() - self.t0 if self.t0 else 0.0
        self.events.append((stamp, text))
        print(f"  [{stamp:6.1f} s] {text}", flush=True)

    def start_broker(self) -> Child:
        self.broker_generation += 1
        hb = str(self.args.heartbeat)
        env = self.env
        if self.args.broker_source:  # another tree's broker (an older commit, say), with this tree's workers and clients
            env = {**env, "PYTHONPATH": str(Path(self.args.broker_source).resolve())}
        child = broker_child(f"broker{self.broker_generation}", self.clients_address, self.workers_address, self.logs, env, "--heartbeat", hb, "--log-level", "info")
        if self.args.broker_source:
            child.cwd = Path(self.args.broker_source).resolve()
        self.children.append(child.start())
        return child

    def start_worker(self) -> Child:
        self.worker_generation += 1
        extra = ("--heartbeat", str(self.args.heartbeat), "--max-batch", str(self.args.max_batch), "--log-level", "info")
        child = worker_child(f"worker{self.worker_generation}", self.workers_address, self.logs, self.env, ("vits", "vits-hypersim"), *extra)
        self.children.append(child.start())
        return child

    def run(self) -> dict[str, Any]:
        args = self.args
        broker = self.start_broker()
        workers = [self.start_worker() for _ in range(args.workers)]
        wait_health(self.clients_address, KEY, workers=args.workers, children=(broker, *workers))
        frame = small_frame()
        stop = threading.Event()
        threads = [
            ClientThread(i, self.clients_address, frame, timeout=args.timeout, retries=args.retries, input_size=args.input_size, stop=stop)
            for i in range(args.clients)
        ]
        for child in (broker, *workers):
            child.mark_start()
        for child in workers:
            self.mark_up(child.pid, True)
        driver_start = rss_mb(os.getpid())
        self.t0 = time.monotonic()
        self.event(f"start: {args.clients} clients, {args.workers} workers, {args.minutes:g} min")
        for thread in threads:
            thread.start()
        duration = args.minutes * 60
        end = self.t0 + duration
        next_kill = self.t0 + args.kill_every
        broker_restart_at = self.t0 + args.broker_restart_at * duration if args.broker_restart_at > 0 else None
        victim = 0
        pending: list[Child] = []  # restarted, not yet registered
        frozen: list[Child] = []  # stopped with SIGSTOP, resumed at thaw_at
        rejoining: list[Child] = []  # resumed, not yet seen registered again
        thaw_at = math.inf
        try:
            while time.monotonic() < end:
                now = time.monotonic()
                for child in list(pending):  # the RSS at start of a restarted worker: once it is serving
                    if child.rss_start is None and now - child.started > 1 and self._registered(child.pid):
                        child.mark_start()
                        pending.remove(child)
                        self.mark_up(child.pid, True)
                        self.event(f"{child.name} (pid {child.pid}) registered")
                for child in list(rejoining):
                    if self._registered(child.pid):
                        rejoining.remove(child)
                        self.mark_up(child.pid, True)
                        self.event(f"{child.name} (pid {child.pid}) registered again")
                if frozen and now >= thaw_at:
                    self._thaw(frozen)
                    rejoining.extend(frozen)
                    frozen, thaw_at = [], math.inf
                if broker_restart_at is not None and now >= broker_restart_at:
                    broker_restart_at = None
                    broker = self._restart_broker(broker)
                elif now >= next_kill and end - now > CHAOS_MARGIN_S and not frozen:
                    next_kill += args.kill_every
                    victims = [(victim + j) % len(workers) for j in range(min(args.kill_together, len(workers)))]
                    victim = (victim + len(victims)) % len(workers)
                    if args.freeze:
                        frozen = [workers[i] for i in victims]
                        for child in frozen:
                            os.kill(child.pid, signal.SIGSTOP)
                            self.mark_up(child.pid, False)
                            self.event(f"SIGSTOP {child.name} (pid {child.pid}) for {args.freeze:g} s")
                        thaw_at = time.monotonic() + args.freeze
                    else:
                        for i in victims:  # all at once, then their replacements
                            workers[i].kill_now(how="SIGKILL (chaos)")
                        for i in victims:
                            workers[i].reap()
                            self.mark_up(workers[i].pid, False)
                            self.event(f"kill -9 {workers[i].name} (pid {workers[i].pid})")
                        time.sleep(args.restart_delay)
                        for i in victims:
                            workers[i] = self.start_worker()
                            pending.append(workers[i])
                            self.event(f"started {workers[i].name} (pid {workers[i].pid}) in its place")
                time.sleep(0.05)
            self.event("time is up: stopping the clients")
        finally:
            if frozen:
                self._thaw(frozen)
            stop.set()
            for thread in threads:
                thread.join(args.timeout * (args.retries + 1) + 30)
        stopped = time.monotonic()
        for child in (broker, *workers):
            child.rss_end = child.rss()  # a worker restarted too late to register keeps rss_start None
        driver_end = rss_mb(os.getpid())
        health = None
        try:
            health = wait_health(self.clients_address, KEY, workers=args.workers, timeout=30)
        except RuntimeError as exc:
            self.event(f"final health check failed: {exc}")
        for child in workers:
            child.stop(signal.SIGTERM, how="SIGTERM (end)")
        broker.stop(signal.SIGTERM, how="SIGTERM (end)")
        outcomes = sorted((o for t in threads for o in t.outcomes), key=lambda o: o.started)
        return self._report(outcomes, stopped, health, driver_start, driver_end, threads)

    def _thaw(self, frozen: list[Child]) -> None:
        for child in frozen:
            if child.alive():
                os.kill(child.pid, signal.SIGCONT)
                self.event(f"SIGCONT {child.name} (pid {child.pid})")

    def _registered(self, pid: int) -> bool:
        from zdepth import Client, ZdepthError

        try:
            with Client(self.clients_address, key=KEY, timeout=1.0, retries=0) as client:
                return any(w.get("pid") == pid for w in client.health()["workers"])
        except ZdepthError:
            return False

    def _restart_broker(self, broker: Child) -> Child:
        sig = signal.SIGKILL if self.args.broker_signal == "kill" else signal.SIGTERM
        broker.stop(sig, how=f"{signal.Signals(sig).name} (chaos)")
        self.event(f"{'kill -9' if sig == signal.SIGKILL else 'SIGTERM'} {broker.name} (pid {broker.pid}), exit {broker.exit_code}")
        time.sleep(self.args.broker_down)
        new = self.start_broker()
        self.event(f"started {new.name} (pid {new.pid}) on the same ports")
        try:
            wait_health(self.clients_address, KEY, workers=self.args.workers, timeout=60, children=(new,))
            self.event(f"{new.name}: all {self.args.workers} workers registered again")
        except RuntimeError as exc:
            self.event(f"workers did not all come back to {new.name}: {exc}")
        new.mark_start()
        return new

    # ------------------------------------------------------------------ report

    def _report(self, outcomes: list[Outcome], stopped: float, health: dict | None, driver_start, driver_end, threads) -> dict[str, Any]:
        args = self.args
        statuses = collections.Counter(o.status for o in outcomes)
        retried = [o for o in outcomes if o.attempts > 1 and o.status not in ("no_reply",)]
        attempts_lost = sum(o.attempts - 1 for o in outcomes if o.status != "no_reply") + sum(o.attempts for o in outcomes if o.status == "no_reply")
        totals = {
            "sent": len(outcomes),
            "ok": statuses.get("ok", 0),
            "errors": {k: v for k, v in sorted(statuses.items()) if k not in ("ok", "no_reply", "exception")},
            "no_reply": statuses.get("no_reply", 0),
            "exception": statuses.get("exception", 0),
            "retried": len(retried),
            "retried_ok": sum(1 for o in retried if o.status == "ok"),
            "attempts_lost": attempts_lost,
        }
        lost = [o for o in outcomes if o.status == "worker_lost"]
        totals["worker_lost"] = len(lost)
        totals["worker_lost_while_a_worker_lived"] = sum(1 for o in lost if self.fewest_up(o.started, o.ended) >= 1)
        unanswered = totals["no_reply"]
        windows = []
        span = stopped - self.t0
        count = max(1, math.ceil(span / args.window - 0.05))  # a last sliver of a window joins the one before
        for i in range(count):
            lo = self.t0 + i * args.window
            hi = self.t0 + (i + 1) * args.window if i < count - 1 else math.inf
            done = [o for o in outcomes if lo <= o.ended < hi]
            ok = [o.latency_ms for o in done if o.status == "ok"]
            stats = _common.summarize(ok)
            happened = [text for stamp, text in self.events if lo - self.t0 <= stamp < hi - self.t0 and not text.startswith(("start:", "time is up"))]
            windows.append({
                "window": f"{i * args.window:.0f}-{min((i + 1) * args.window, span):.0f} s",
                "done": len(done),
                "ok": len(ok),
                "errors": sum(1 for o in done if o.status not in ("ok",)),
                "retried": sum(1 for o in done if o.attempts > 1),
                "p50_ms": stats.get("p50"),
                "p90_ms": stats.get("p90"),
                "p99_ms": stats.get("p99"),
                "max_ms": stats.get("max"),
                "events": "; ".join(happened),
            })  # fmt: skip
        processes = [child.row() for child in self.children]
        driver_growth = None if driver_start is None or driver_end is None else driver_end - driver_start
        driver = {"process": "driver (client threads)", "role": "clients", "pid": os.getpid(), "rss_start_mb": driver_start, "rss_end_mb": driver_end}
        processes.append({**driver, "growth_mb": driver_growth, "ended": "-", "exit": None})
        kills = sum(1 for _, text in self.events if text.startswith("kill -9 worker"))
        freezes = sum(1 for _, text in self.events if text.startswith("SIGSTOP worker"))
        broker_restarts = self.broker_generation - 1
        failures = []
        if unanswered:
            failures.append(f"{unanswered} call(s) got no reply at all")
        if totals["worker_lost_while_a_worker_lived"]:
            failures.append(f"{totals['worker_lost_while_a_worker_lived']} call(s) got worker_lost while a worker was up")
        if totals["exception"]:
            failures.append(f"{totals['exception']} call(s) raised something other than a zdepth error")
        if health is None:
            failures.append("the cluster was not healthy at the end")
        graceful = [c for c in self.children if c.ended.startswith("SIGTERM (end)")]
        bad_exits = [f"{c.name} exited {c.exit_code}" for c in graceful if c.exit_code != 0]
        if bad_exits:
            failures.append("unclean exit at the end: " + ", ".join(bad_exits))
        ok_latency = _common.summarize([o.latency_ms for o in outcomes if o.status == "ok"])
        details = collections.Counter(o.detail.split(";")[0][:160] for o in outcomes if o.status not in ("ok",))
        return {
            "totals": totals,
            "unanswered": unanswered,
            "worker_kills": kills,
            "worker_freezes": freezes,
            "broker_restarts": broker_restarts,
            "latency_ok_ms": ok_latency,
            "windows": windows,
            "processes": processes,
            "events": [{"t_s": round(stamp, 2), "event": text} for stamp, text in self.events],
            "error_details": dict(details.most_common(20)),
            "per_client": [collections.Counter(o.status for o in t.outcomes) for t in threads],
            "duration_s": stopped - self.t0,
            "failures": failures,
            "passed": not failures,
        }


def main(argv: list[str] | None = None) -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the clients run")
    parser.add_argument("--clients", type=int, default=4, help="client threads, each with its own zdepth.Client")
    parser.add_argument("--workers", type=int, default=2, help="CPU workers")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between worker kills (SIGKILL, then a fresh worker)")
    parser.add_argument("--kill-together", type=int, default=1, help="workers killed (or frozen) at once, each time")
    parser.add_argument("--freeze", type=float, default=0.0, help="stop the workers with SIGSTOP for this many seconds (then SIGCONT) instead of killing them")
    parser.add_argument("--restart-delay", type=float, default=1.0, help="seconds between a worker's kill and its replacement's start")
    parser.add_argument("--broker-restart-at", type=float, default=0.5, help="when to restart the broker, as a fraction of the run (0: never)")
    parser.add_argument("--broker-signal", choices=("kill", "term"), default="kill", help="how the broker is stopped for its restart")
    parser.add_argument("--broker-down", type=float, default=1.0, help="seconds the broker stays down")
    parser.add_argument("--broker-source", help="run the broker of this source tree instead (its PYTHONPATH), to compare two brokers under the same faults")
    parser.add_argument("--heartbeat", type=float, default=0.5, help="heartbeat interval of broker and workers, seconds (liveness 3)")
    parser.add_argument("--timeout", type=float, default=8.0, help="client timeout per attempt, seconds")
    parser.add_argument("--retries", type=int, default=2, help="client resends after a lost reply")
    parser.add_argument("--input-size", type=int, default=28, help="network input size (small: the CPU keeps up)")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--window", type=float, default=10.0, help="seconds per latency window")
    parser.add_argument("--weights-dir", help="checkpoints to use (default: generated or golden vits in a temporary folder)")
    parser.add_argument("--logs", help="folder for the processes' logs (default: a temporary folder, kept)")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.kill_every, args.window = min(args.minutes, 0.5), min(args.kill_every, 10.0), min(args.window, 10.0)
    machine = _common.machine_info(torch_info=False)
    print(_common.machine_line(machine))
    weights_dir, source = _common.prepare_weights(args.weights_dir, ["vits"])
    for dataset in ("hypersim",):
        link = weights_dir / f"depth_anything_v2_metric_{dataset}_vits.pth"
        if not link.exists():
            link.symlink_to((weights_dir / "depth_anything_v2_vits.pth").resolve())
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="zdepth-soak-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"weights: {source}; logs in {logs}")
    soak = Soak(args, logs, weights_dir)
    try:
        result = soak.run()
    finally:
        for child in soak.children:
            if child.alive():
                child.stop(signal.SIGKILL, how="SIGKILL (cleanup)")
    report = _common.Report()
    totals = result["totals"]
    row = {"sent": totals["sent"], "ok": totals["ok"], **{f"err {k}": v for k, v in totals["errors"].items() if k != "worker_lost"}}
    row["worker_lost"] = totals["worker_lost"]
    row["worker_lost while a worker lived"] = totals["worker_lost_while_a_worker_lived"]
    row.update({"no reply (unanswered)": totals["no_reply"], "exceptions": totals["exception"], "retried": totals["retried"], "attempts lost": totals["attempts_lost"]})
    together = f"{args.kill_together} workers at once" if args.kill_together > 1 else "a worker"
    if args.freeze:
        chaos = f"{together} stopped (SIGSTOP) for {args.freeze:g} s every {args.kill_every:g} s ({result['worker_freezes']} stops)"
    else:
        chaos = f"{together} killed (-9) every {args.kill_every:g} s ({result['worker_kills']} kills)"
    title = f"Soak: {args.clients} clients x {args.workers} CPU workers, {result['duration_s']:.0f} s, {chaos}, broker {args.broker_signal}ed and restarted {result['broker_restarts']}x"
    if args.broker_source:
        title += f", broker from {args.broker_source}"
    report.table([row], list(row), title=title)
    lat = result["latency_ok_ms"]
    percentiles = ", ".join(f"{name} {_common.fmt(lat.get(name))}" for name in ("p50", "p90", "p99", "max"))
    report.note(f"ok latency over the whole run (ms, retries included): {percentiles}")
    columns = ["window", "done", "ok", "errors", "retried", "p50_ms", "p90_ms", "p99_ms", "max_ms", "events"]
    report.table(result["windows"], columns, title=f"Per {args.window:g} s window (calls by the time they ended)")
    report.table(result["processes"], ["process", "role", "pid", "rss_start_mb", "rss_end_mb", "growth_mb", "ended", "exit"], title="Processes: RSS (MB) at start and end")
    if result["error_details"]:
        report.table([{"count": v, "error": k} for k, v in result["error_details"].items()], ["count", "error"], title="Errors seen")
    verdict = "PASS" if result["passed"] else "FAIL: " + "; ".join(result["failures"])
    report.note(f"{verdict}. unanswered (no reply to any attempt) = {result['unanswered']}; logs in {logs}")
    out = {"benchmark": NAME, "machine": machine, "report": report.parts, "weights": source, "config": vars(args), "logs": str(logs), **result}
    _common.write_json(NAME, out, args.json)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
