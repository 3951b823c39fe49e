"""Overload: many callers with short deadlines against one slow worker, through a real broker.

``--callers`` threads (20) each send requests back to back over their own
DEALER, each with a deadline (``--timeout``, 1 s): a caller waits for the
reply until its deadline, then gives up and sends the next one. One worker
process speaking the protocol (``testing.FakeWorker``) takes
``--compute-ms`` (50 ms) per batch of up to ``--batch`` requests (1), holds
up to ``--capacity`` (2) and, like the real worker, does not compute a request
whose deadline passed while it waited. Offered load is far above what the
worker can do, which is the point: what matters is how much of the work it
does reaches a caller in time.

The report:

- ``useful share``: replies the callers received ``ok`` before their deadline,
  divided by the requests the worker computed. Work answered after its
  caller gave up was wasted GPU time;
- the callers' outcomes: ``ok`` (in time), ``timeout`` (answered so by the
  broker or worker, without computing), ``gave up`` (no reply by the
  deadline), ``late`` (a reply that came after its caller had given up), other
  error codes;
- latency p50/p99 of the in-time replies, and fairness: the fewest and most
  ``ok`` any one caller got;
- the worker's own count (computed, skipped because already expired) and its
  rate against its ceiling (``batch / compute``).

``--source DIR`` runs the broker of another source tree (say a checkout of an
older commit) with the same callers and worker; ``--baseline DIR`` runs that
tree first and this one (or ``--source``) second, and prints them side by side
with ratios. A tree whose broker has no handshake authentication is spoken to
without PLAIN (``--plain``/``--no-plain`` force it).

    python benchmarks/overload.py [--seconds 25] [--callers 20] [--baseline /path/to/older/checkout]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common
import _peers
from zdepth import testing

NAME = "overload"
KEY = "overload-key"


class Caller(threading.Thread):
    """Requests one after another, each waited for until its deadline; every outcome recorded."""

    def __init__(self, index: int, ctx, endpoint: str, *, key: str, plain: bool, timeout: float, image_bytes: int, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"caller-{index}")
        self.index, self.ctx, self.endpoint, self.key, self.plain = index, ctx, endpoint, key, plain
        self.timeout, self.stop_event = timeout, stop
        self.body = (b"{}", b"\0" * image_bytes)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.latencies_ms: list[float] = []

    def run(self) -> None:
        sock = testing.dealer(self.ctx, self.endpoint, key=self.key, plain=self.plain)
        n = 0
        try:
            while not self.stop_event.is_set():
                n += 1
                request_id = f"c{self.index}-{n}"
                started = time.monotonic()
                deadline = started + self.timeout
                testing.send_request(sock, request_id, key=self.key, timeout_ms=self.timeout * 1000, body=self.body)
                while True:
                    left = deadline - time.monotonic()
                    got = testing.recv_reply(sock, max(left, 0.0)) if left > 0 else None
                    if got is None:
                        self.outcomes["gave up"] += 1
                        break
                    header = got[0]
                    if header.get("id") != request_id:  # the answer to a request this caller gave up on
                        self.outcomes["late"] += 1
                        continue
                    status = header.get("status")
                    if status == "ok":
                        self.latencies_ms.append((time.monotonic() - started) * 1000)
                    self.outcomes[status] += 1
                    break
            # The last request got its answer or was given up; late answers still on the wire are counted.
            while (got := testing.recv_reply(sock, 0.2)) is not None:
                self.outcomes["late"] += 1
        finally:
            sock.close(0)


def run_overload(
    source: Path, *, plain: bool, callers: int = 20, seconds: float = 25.0, timeout: float = 1.0,
    compute_ms: float = 50.0, capacity: int = 2, batch: int = 1, image_bytes: int = 1024, logs: Path | None = None,
) -> dict[str, Any]:
    """One run against the broker of ``source``; returns the counts and figures of the report."""
    import zmq

    logs = logs or Path(tempfile.mkdtemp(prefix="zdepth-overload-"))
    broker = _peers.start_source_broker(source, logs, key=KEY)
    worker = None
    ctx = zmq.Context()
    try:
        options = {"name": "slow", "capacity": capacity, "batch": batch, "compute_s": compute_ms / 1000}
        worker = _peers.start_protocol_worker(broker.workers, KEY, plain, options)
        testing.wait_workers_ready(ctx, broker.clients, 1, key=KEY, plain=plain)
        stop = threading.Event()
        threads = [Caller(i, ctx, broker.clients, key=KEY, plain=plain, timeout=timeout, image_bytes=image_bytes, stop=stop) for i in range(callers)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(timeout + 10)
        elapsed = time.monotonic() - started
        time.sleep(0.2)
        counts = _peers.stop_protocol_worker(*worker) or {}
        worker = None
    finally:
        if worker is not None:
            _peers.stop_protocol_worker(*worker)
        broker.stop()
        ctx.destroy(linger=0)
    outcomes = collections.Counter()
    for thread in threads:
        outcomes.update(thread.outcomes)
    latencies = [ms for thread in threads for ms in thread.latencies_ms]
    per_caller_ok = [thread.outcomes.get("ok", 0) for thread in threads]
    computed = counts.get("computed", 0)
    stats = _common.summarize(latencies)
    ceiling = batch / (compute_ms / 1000)
    return {
        "source": str(source),
        "plain": plain,
        "seconds": round(elapsed, 1),
        "sent": sum(outcomes[k] for k in outcomes if k != "late"),
        "outcomes": dict(outcomes),
        "ok": outcomes.get("ok", 0),
        "worker": counts,
        "computed": computed,
        "useful_share": (outcomes.get("ok", 0) / computed) if computed else None,
        "ok_per_s": outcomes.get("ok", 0) / elapsed,
        "computed_per_s": computed / elapsed,
        "ceiling_per_s": ceiling,
        "p50_ms": stats.get("p50"),
        "p99_ms": stats.get("p99"),
        "ok_per_caller_min": min(per_caller_ok),
        "ok_per_caller_max": max(per_caller_ok),
        "logs": str(logs),
    }


ROWS = [
    ("useful share (ok in time / computed)", "useful_share"),
    ("worker computed", "computed"),
    ("callers ok in time", "ok"),
    ("callers timeout (answered)", ("outcomes", "timeout")),
    ("callers gave up (no reply by deadline)", ("outcomes", "gave up")),
    ("late replies (after the caller gave up)", ("outcomes", "late")),
    ("other errors", "other_errors"),
    ("ok/s", "ok_per_s"),
    ("computed/s (ceiling)", "computed_per_s"),
    ("ok latency p50 ms", "p50_ms"),
    ("ok latency p99 ms", "p99_ms"),
    ("ok per caller, min", "ok_per_caller_min"),
    ("ok per caller, max", "ok_per_caller_max"),
]


def figure(result: dict[str, Any], key) -> Any:
    if key == "other_errors":
        return sum(v for k, v in result["outcomes"].items() if k not in ("ok", "timeout", "gave up", "late"))
    if isinstance(key, tuple):
        return result[key[0]].get(key[1], 0)
    return result.get(key)


def main(argv: list[str] | None = None) -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=25.0, help="how long the callers send")
    parser.add_argument("--timeout", type=float, default=1.0, help="each request's deadline, seconds")
    parser.add_argument("--compute-ms", type=float, default=50.0, help="the worker's time per batch")
    parser.add_argument("--capacity", type=int, default=2, help="requests the worker may hold")
    parser.add_argument("--batch", type=int, default=1, help="requests per batch")
    parser.add_argument("--source", default=str(_common.ROOT), help="source tree whose broker runs (PYTHONPATH of the broker process)")
    parser.add_argument("--baseline", help="another source tree, run first and shown beside --source")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=None, help="peers prove the key at the handshake (default: if the tree has zdepth/auth.py)")
    parser.add_argument("--logs", help="folder for the broker logs (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.callers = min(args.seconds, 3.0), min(args.callers, 4)
    machine = _common.machine_info(torch_info=False)
    print(_common.machine_line(machine))
    trees = [("before", Path(args.baseline)), ("after", Path(args.source))] if args.baseline else [("run", Path(args.source))]
    results = {}
    for label, tree in trees:
        plain = _peers.has_plain_handshake(tree) if args.plain is None else args.plain
        print(f"{label}: broker from {tree} ({'PLAIN' if plain else 'no PLAIN'}), {args.callers} callers x {args.seconds:g} s ...", flush=True)
        results[label] = run_overload(
            tree, plain=plain, callers=args.callers, seconds=args.seconds, timeout=args.timeout, compute_ms=args.compute_ms,
            capacity=args.capacity, batch=args.batch, logs=Path(args.logs) if args.logs else None,
        )  # fmt: skip
    report = _common.Report()
    title = (
        f"Overload: {args.callers} callers, {args.timeout:g} s deadlines, back to back, against one worker of "
        f"{args.compute_ms:g} ms per batch of {args.batch}, capacity {args.capacity}, {args.seconds:g} s"
    )
    rows = []
    for name, key in ROWS:
        row = {"figure": name, **{label: figure(result, key) for label, result in results.items()}}
        if key == "computed_per_s":
            row["ceiling"] = results[trees[-1][0]]["ceiling_per_s"]
        if args.baseline:
            row["after / before"] = _common.ratio(row["after"], row["before"])
        rows.append(row)
    columns = ["figure", *results, *(["after / before"] if args.baseline else []), "ceiling"]
    report.table(rows, columns, title=title)
    last = results[trees[-1][0]]
    share = last["useful_share"]
    verdict = "meets" if share is not None and share >= 0.9 else "misses"
    report.note(f"useful share {_common.fmt(share)} ({verdict} the 0.9 target); trees: " + "; ".join(f"{label} = {tree}" for label, tree in trees))
    out = {"benchmark": NAME, "machine": machine, "report": report.parts, "config": vars(args), "results": results}
    _common.write_json(NAME, out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
