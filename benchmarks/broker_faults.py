"""The broker on bad days, as figures: each fault of tests/test_broker_faults.py, measured.

Each scenario starts a fresh broker process from a source tree (``--source``,
default this checkout: its directory is the broker's PYTHONPATH), with
protocol-speaking workers and raw client sockets in this process
(``testing.FakeWorker``, ``testing.dealer``), and prints what happened
as numbers rather than pass or fail:

- ``freeze``: two of three workers, holding four requests, freeze together
  while a third with room is live: how many of the four fail ``worker_lost``;
- ``freeze-busy``: the same, with the live worker more loaded than the
  frozen pair (so the least-loaded choice points at a frozen one);
- ``vanished``: a request sent to a worker that had just vanished, then lost
  with the next one: its status (a send that failed should cost nothing);
- ``freed slot``: a worker's only slot is freed by an expired request: how
  long the request queued behind it waits to be dispatched;
- ``lazy reader``: a client sends 600 requests with 1 MiB replies and never
  reads: the broker's RSS growth, and after that client closed;
- ``stranger``: a peer without the key sends one message of 10 x 40 MiB
  frames: the broker's peak RSS growth, and what the stranger gets back;
- ``key first``: a wrong key with a bad version, op and timeout: the status;
- ``drain``: a request sent while the broker drains (SIGTERM): its reply;
- ``stuck``: a worker that heartbeats but never answers, beside a good one,
  and 12 requests of 300 ms one after another: how many the stuck one gets;
- ``backlog``: one client queues 150 requests, another sends one: its wait;
- ``hopeless``: a request that cannot finish before its deadline on a busy
  worker: whether it reaches the worker, and when it is answered;
- ``overload``: ``overload.py``'s useful share (20 callers, one slow worker).

``--baseline DIR`` runs every scenario against that tree's broker first (a
checkout of an older commit, say) and prints the two side by side. Peers prove
the key at the handshake (PLAIN) when the tree's broker asks for it (it has
``zdepth/auth.py``); ``--plain``/``--no-plain`` force it.

    git worktree add /tmp/zdepth-before <commit>
    python benchmarks/broker_faults.py --baseline /tmp/zdepth-before
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import _common
import _peers
import overload
from zdepth import testing

NAME = "broker_faults"
KEY = "faults-key"
MiB = 1 << 20


class Scene:
    """One scenario's broker, context and workers; everything is stopped on exit."""

    def __init__(self, source: Path, plain: bool, logs: Path, **broker_fields: Any) -> None:
        import zmq

        self.source, self.plain = source, plain
        self.broker = _peers.start_source_broker(source, logs, key=KEY, **broker_fields)
        self.ctx = zmq.Context()
        self.workers: list[testing.FakeWorker] = []
        self.socks = []

    def worker(self, name: str, **options: Any) -> testing.FakeWorker:
        worker = testing.FakeWorker(self.ctx, self.broker.workers, key=KEY, plain=self.plain, name=name, **options)
        self.workers.append(worker)
        return worker

    def ready(self, count: int) -> None:
        testing.wait_workers_ready(self.ctx, self.broker.clients, count, key=KEY, plain=self.plain)

    def client(self, *, key: str | None = KEY, plain: bool | None = None, **options: Any):
        sock = testing.dealer(self.ctx, self.broker.clients, key=key, plain=self.plain if plain is None else plain, **options)
        self.socks.append(sock)
        return sock

    def send(self, sock, request_id: str, **options: Any) -> None:
        testing.send_request(sock, request_id, key=KEY, **options)

    def health(self) -> dict[str, Any] | None:
        return testing.broker_health(self.ctx, self.broker.clients, key=KEY, plain=self.plain)

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc: Any) -> None:
        for worker in self.workers:
            worker.stop()
        for sock in self.socks:
            sock.close(0)
        self.broker.stop(signal.SIGKILL)
        self.ctx.destroy(linger=0)


def wait_until(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``predicate`` held, or None if it did not within ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.005)
    return time.monotonic() - started


def replies(sock, count: int, timeout: float) -> dict[str, dict[str, Any]]:
    """Up to ``count`` replies by id, waiting at most ``timeout`` seconds in all."""
    got: dict[str, dict[str, Any]] = {}
    end = time.monotonic() + timeout
    while len(got) < count and (left := end - time.monotonic()) > 0:
        reply = testing.recv_reply(sock, left)
        if reply is not None:
            got[str(reply[0].get("id"))] = reply[0]
    return got


def status(reply: dict[str, Any] | None) -> str:
    return "no reply" if reply is None else str(reply.get("status"))


# ----------------------------------------------------------------------------- scenarios


def freeze(source: Path, plain: bool, logs: Path) -> list[tuple[str, Any]]:
    with Scene(source, plain, logs) as scene:
        frozen = [scene.worker(f"frozen{i}", capacity=4, stuck=True) for i in range(2)]
        scene.ready(2)
        client = scene.client()
        for i in range(4):
            scene.send(client, f"r{i}", timeout_ms=20_000)
        wait_until(lambda: sum(len(w.received) for w in frozen) == 4, 5)
        scene.worker("live", capacity=8)
        scene.ready(3)
        started = time.monotonic()
        for worker in frozen:
            worker.frozen = True
        got = replies(client, 4, 12)
        statuses = collections.Counter(status(got.get(f"r{i}")) for i in range(4))
        return [
            ("worker_lost of 4 requests", statuses.get("worker_lost", 0)),
            ("ok of 4", statuses.get("ok", 0)),
            ("s to the last reply", round(time.monotonic() - started, 2) if len(got) == 4 else None),
        ]


def freeze_busy(source: Path, plain: bool, logs: Path) -> list[tuple[str, Any]]:
    """As ``freeze``, but the live worker is the busier one: a request of the first frozen worker to
    expire goes to the least-loaded worker left, which is the other frozen one unless it is removed too."""
    with Scene(source, plain, logs) as scene:
        live = scene.worker("live", capacity=4, batch=4, compute_s=5.0)
        scene.ready(1)
        client = scene.client()
        for i in range(2):
            scene.send(client, f"busy{i}", timeout_ms=30_000)
        wait_until(lambda: len(live.received) == 2, 5)
        frozen = [scene.worker(f"frozen{i}", capacity=4, stuck=True) for i in range(2)]
        scene.ready(3)
        for i in range(2):
            scene.send(client, f"r{i}", timeout_ms=30_000)
        wait_until(lambda: sum(len(w.received) for w in frozen) == 2, 5)
        started = time.monotonic()
        for worker in frozen:
            worker.frozen = True
        got = replies(client, 4, 20)
        statuses = collections.Counter(status(got.get(f"r{i}")) for i in range(2))
        return [
            ("worker_lost of the 2 requests the frozen pair held", statuses.get("worker_lost", 0)),
            ("ok of 2", statuses.get("ok", 0)),
            ("s to the last of them", round(time.monotonic() - started, 2) if all(f"r{i}" in got for i in range(2)) else None),
        ]


def vanished(source: Path, plain: bool, logs: Path) -> list[tuple[str, Any]]:
    with Scene(source, plain, logs, interval_s=1.0) as scene:
        loaded = scene.worker("loaded", capacity=2, stuck=True, interval_s=1.0)
        gone = scene.worker("gone", capacity=2, stuck=True, interval_s=1.0)
        scene.ready(2)
        client = scene.client()
        scene.send(client, "first", timeout_ms=20_000)
        wait_until(lambda: len(loaded.received) + len(gone.received) == 1, 5)
        if gone.received:
            loaded, gone = gone, loaded
        gone.vanish()
        time.sleep(0.1)
        scene.send(client, "r", timeout_ms=20_000)  # to the emptier worker: the one that vanished
        wait_until(lambda: any(h["id"] == "r" for h in loaded.received), 10)
        loaded.vanish()  # the one real loss of "r"
        scene.worker("rescue", capacity=2, interval_s=1.0)
        got = replies(client, 2, 15)
        return [("status of the request (ok: the failed send cost nothing)", status(got.get("r"))), ("status of the other", status(got.get("first")))]


def freed_slot(source: Path, plain: bool, logs: Path) -> list[tuple[str, Any]]:
    with Scene(source, plain, logs) as scene:
        worker = scene.worker("slow", capacity=1, stuck=True)
        scene.ready(1)
        client = scene.client()
        scene.send(client, "slow", timeout_ms=500)
        wait_until(lambda: len(worker.received) == 1, 5)
        scene.send(client, "waiting", timeout_ms=8000)
        first = replies(client, 1, 5)
        freed = time.monotonic()
        worker.release()  # its batch is over: the worker is idle again
        waited = wait_until(lambda: len(worker.received) == 2, 7.5)
        got = replies(client, 1, 9)
        return [
            ("status of the expired request", status(first.get("slow"))),
            ("s the queued request waited after the slot freed", round(waited, 3) if waited is not None else f"> {time.monotonic() - freed:.1f} (never sent)"),
            ("status of the queued request", status(got.get("waiting"))),
        ]


def lazy_reader(source: Path, plain: bool, logs: Path) -> list[tuple[str, Any]]:
    import zmq

    with Scene(source, plain, logs) as scene:
        scene.worker("big", capacity=8, reply_bytes=MiB)
        scene.ready(1)
        time.sleep(0.3)
        before = scene.broker.rss_mb()
        lazy = testing.dealer(scene.ctx, scene.broker.clients, key=KEY, plain=plain)
        lazy.setsockopt(zmq.RCVHWM, 1)
        lazy.setsockopt(zmq.RCVBUF, 64 * 1024)
        for i in range(600):
            scene.send(lazy, f"lazy{i}", timeout_ms=30_000)
            if i % 50 == 49:
                time.sleep(0.1)
        time.sleep(2.0)
        grown = scene.broker.rss_mb() - before
        other = scene.client()
        started = time.monotonic()
        scene.send(other, "other")
        got = replies(other, 1, 10)
        other_s = time.monotonic() - started
        lazy.close(0)
        time.sleep(3.0)
        after_close = scene.broker.rss_mb() - before
        return [
            ("broker RSS growth, MB (600 unread 1 MiB replies)", round(grown)),
            ("broker RSS growth, MB, 3 s after that client closed", round(after_close)),
            ("another client's request", f"{status(got.get('other'))} in {other_s:.2f} s"),
        ]


def stranger(source: Path, plain: bool, logs: Path) -> list[tuple[str, Any]]:
    import zmq

    with Scene(source, plain, logs) as scene:
        scene.worker("w")
        scene.ready(1)
        time.sleep(0.3)
        before = scene.broker.rss_mb()
        sock = scene.client(key=None, plain=False)  # proves nothing at the handshake
        sock.setsockopt(zmq.SNDTIMEO, 2000)  # a refused handshake can leave it no connection to queue on
        frame = zmq.Frame(b"\0" * (40 * MiB))
        try:
            sock.send_multipart([b"header", *([frame] * 10)], copy=False)
            sent = "sent"
        except zmq.Again:
            sent = "refused before it could be sent"
        peak = before
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            peak = max(peak, scene.broker.rss_mb() or 0)
            time.sleep(0.02)
        answer = testing.recv_reply(sock, 0.2)
        client = scene.client()
        scene.send(client, "still-serving")
        got = replies(client, 1, 10)
        return [
            ("broker peak RSS growth, MB (10 x 40 MiB from a peer without the key)", round(peak - before)),
            ("what the stranger got back", f"nothing ({sent})" if answer is None else status(answer[0])),
            ("a key holder's request afterwards", status(got.get("still-serving"))),
        ]


def key_first(source: Path, plain: bool, logs: Path) -> list[tuple[str, Any]]:
    import msgpack

    with Scene(source, plain, logs) as scene:
        client = scene.client()
        client.send_multipart([msgpack.packb({"v": 99, "id": "x", "key": "wrong", "op": "explode", "timeout_ms": -5}), b"p"])
        got = replies(client, 1, 5).get("x")
        told = [w for w in ("version", "op", "timeout", "frames") if got is not None and w in str(got.get("message", ""))]
        return [("status for a wrong key + bad version, op, timeout", status(got)), ("rules the message gives away", ", ".join(told) or "none")]


def drain(source: Path, plain: bool, logs: Path) -> list[tuple[str, Any]]:
    with Scene(source, plain, logs) as scene:
        worker = scene.worker("holding", capacity=2, stuck=True)
        scene.ready(1)
        client = scene.client()
        scene.send(client, "held", timeout_ms=20_000)
        wait_until(lambda: len(worker.received) == 1, 5)
        scene.broker.popen.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        started = time.monotonic()
        scene.send(client, "late", timeout_ms=20_000)
        late = replies(client, 1, 2.0).get("late")
        late_s = time.monotonic() - started
        worker.release()  # it finishes what it held, within the drain timeout
        held = replies(client, 1, 6).get("held")
        try:
            code = scene.broker.popen.wait(10)
        except Exception:
            code = None
        return [
            ("reply to a request sent during the drain", f"{status(late)} after {late_s:.2f} s" if late else f"none within {late_s:.1f} s"),
            ("the request held at the worker", status(held)),
            ("broker exit status", code),
        ]


def stuck(source: Path, plain: bool, logs: Path) -> list[tuple[str, Any]]:
    with Scene(source, plain, logs) as scene:
        bad = scene.worker("stuck", capacity=1, stuck=True)
        scene.ready(1)
        scene.worker("good", capacity=1, compute_s=0.05)
        scene.ready(2)
        client = scene.client()
        statuses = collections.Counter()
        for i in range(12):
            scene.send(client, f"r{i}", timeout_ms=300)
            statuses[status(replies(client, 1, 5).get(f"r{i}"))] += 1
        health = scene.health() or {}
        state = {w.get("name"): w.get("state", "-") for w in health.get("workers", [])}
        return [
            ("requests the stuck worker received, of 12", len(bad.received)),
            ("ok of 12", statuses.get("ok", 0)),
            ("the stuck worker's state in health", state.get("stuck", "-")),
        ]


def backlog(source: Path, plain: bool, logs: Path) -> list[tuple[str, Any]]:
    with Scene(source, plain, logs) as scene:
        scene.worker("w", capacity=1, compute_s=0.02)
        scene.ready(1)
        greedy = scene.client()
        for i in range(150):
            scene.send(greedy, f"g{i}", timeout_ms=60_000)
        time.sleep(0.2)
        interactive = scene.client()
        started = time.monotonic()
        scene.send(interactive, "mine", timeout_ms=60_000)
        got = replies(interactive, 1, 15).get("mine")
        return [("s the single request waited behind 150 of another client's", round(time.monotonic() - started, 2) if got else None), ("its status", status(got))]


def hopeless(source: Path, plain: bool, logs: Path) -> list[tuple[str, Any]]:
    with Scene(source, plain, logs) as scene:
        worker = scene.worker("slow", capacity=1, compute_s=0.6)
        scene.ready(1)
        client = scene.client()
        scene.send(client, "warm", timeout_ms=5000)
        replies(client, 1, 5)
        started = time.monotonic()
        scene.send(client, "busy", timeout_ms=5000)
        scene.send(client, "hopeless", timeout_ms=300)  # 0.3 s left; the worker takes 0.6 s and is busy
        got = {}
        answered = None
        end = time.monotonic() + 6
        while len(got) < 2 and time.monotonic() < end:
            reply = testing.recv_reply(client, max(0.0, end - time.monotonic()))
            if reply is not None:
                got[reply[0].get("id")] = reply[0]
                if reply[0].get("id") == "hopeless":
                    answered = time.monotonic() - started
        reached = any(h["id"] == "hopeless" for h in worker.received)
        return [
            ("the hopeless request reached the busy worker", "yes" if reached else "no"),
            ("its status, and when", f"{status(got.get('hopeless'))} after {answered:.2f} s" if answered is not None else "no reply"),
        ]


def overloaded(source: Path, plain: bool, logs: Path, seconds: float) -> list[tuple[str, Any]]:
    result = overload.run_overload(source, plain=plain, seconds=seconds, logs=logs)
    return [
        ("share of computed work that reached a caller in time", round(result["useful_share"], 3) if result["useful_share"] is not None else None),
        ("callers ok / worker computed", f"{result['ok']} / {result['computed']}"),
        ("ok per caller, min-max", f"{result['ok_per_caller_min']}-{result['ok_per_caller_max']}"),
    ]


SCENARIOS: dict[str, tuple[str, Callable[..., list[tuple[str, Any]]]]] = {
    "freeze": ("two of three workers freeze together", freeze),
    "freeze-busy": ("two of three freeze, the live one busier", freeze_busy),
    "vanished": ("a send to a vanished worker", vanished),
    "freed-slot": ("a slot freed by an expired request", freed_slot),
    "lazy-reader": ("a client that never reads", lazy_reader),
    "stranger": ("a stranger's large message", stranger),
    "key-first": ("the key judged first", key_first),
    "drain": ("a request during the drain", drain),
    "stuck": ("a stuck worker", stuck),
    "backlog": ("one client's backlog, another's request", backlog),
    "hopeless": ("work that cannot finish in time", hopeless),
    "overload": ("20 callers, one slow worker", overloaded),
}


def run_all(source: Path, plain: bool, names: list[str], logs: Path, overload_seconds: float) -> dict[str, list[tuple[str, Any]]]:
    results = {}
    for name in names:
        title, scenario = SCENARIOS[name]
        started = time.monotonic()
        try:
            extra = (overload_seconds,) if name == "overload" else ()
            results[name] = scenario(source, plain, logs / name, *extra)
        except Exception as exc:  # one scenario's failure is a figure too; the others still run
            traceback.print_exc()
            results[name] = [("error", f"{type(exc).__name__}: {exc}")]
        print(f"  {name}: {results[name]} ({time.monotonic() - started:.1f} s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(_common.ROOT), help="source tree whose broker runs (PYTHONPATH of the broker process)")
    parser.add_argument("--baseline", help="another source tree, run first and shown beside --source")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=None, help="peers prove the key at the handshake (default: if the tree has zdepth/auth.py)")
    parser.add_argument("--only", help=f"comma-separated scenarios (of: {', '.join(SCENARIOS)})")
    parser.add_argument("--overload-seconds", type=float, default=20.0, help="how long the overload scenario runs")
    parser.add_argument("--logs", help="folder for the broker logs (default: a temporary folder)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    if args.quick:
        names = [n for n in names if n in ("key-first", "freed-slot", "backlog")]
    machine = _common.machine_info(torch_info=False)
    print(_common.machine_line(machine))
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="zdepth-broker-faults-"))
    trees = [("before", Path(args.baseline)), ("after", Path(args.source))] if args.baseline else [("run", Path(args.source))]
    results = {}
    for label, tree in trees:
        plain = _peers.has_plain_handshake(tree) if args.plain is None else args.plain
        print(f"{label}: broker from {tree} ({'PLAIN' if plain else 'no PLAIN'})", flush=True)
        results[label] = run_all(tree, plain, names, logs / label, args.overload_seconds)
    rows = []
    for name in names:
        figures = [dict(results[label][name]) for label, _ in trees]
        labels = list(dict.fromkeys(k for f in figures for k in f))
        for i, figure in enumerate(labels):
            row = {"behaviour": SCENARIOS[name][0] if i == 0 else "", "figure": figure}
            for (label, _), values in zip(trees, figures):
                row[label] = values.get(figure)
            rows.append(row)
    report = _common.Report()
    report.table(rows, ["behaviour", "figure", *[label for label, _ in trees]], title="Broker under faults")
    report.note("trees: " + "; ".join(f"{label} = {tree}" for label, tree in trees) + f"; broker logs in {logs}")
    out = {"benchmark": NAME, "machine": machine, "report": report.parts, "config": vars(args), "results": {k: {n: dict(v) for n, v in r.items()} for k, r in results.items()}}
    _common.write_json(NAME, out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
