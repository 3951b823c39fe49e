"""Failover: how long client streams go without results when the broker they use is killed (kill -9).

Two real brokers run as their own processes on loopback ports; ``--workers``
worker processes (2) each speak the worker protocol to both brokers at once
(a connection and a READY per broker, READY again when a restarted broker does
not know them) and answer each request ``--compute-ms`` (10) after it arrived
with a depth map the size of the frame. ``--streams`` client processes (2: one
``zdepth.Client.stream``, one ``zdepth.AsyncClient.stream``, alternating) send
``--size`` frames (120x160) every ``--pace-ms`` (10) with up to 4 in flight,
given both brokers, ``timeout`` ``--timeout`` (3 s) and ``retries=1``.

Each of ``--rounds`` (5) rounds lets the streams run, sends SIGKILL to the
broker they use (the first, then the other: a client stays where it moved),
and restarts that broker on the same ports once the streams are on the other
one, so it is back in time for the next round.

The report, per stream kind:

- ``failover ms``: from the last result the stream gave before the kill (it
  came through the broker that died) to the first it gave through the other
  broker: p50 and max over rounds;
- frames, failed frames (with ``retries=1`` a request out on the dead broker
  is resent once to the other, so none should fail), frames lost or repeated
  (each frame must be given back exactly once, in order), and the slowest
  frame against its bound, ``timeout * (retries + 1)``.

    python benchmarks/failover.py [--rounds 5] [--streams 2] [--workers 2]
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import _peers

NAME = "failover"
KEY = "failover-key"
RETRIES = 1


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width)


def worker_main(conn, endpoints: list[str], key: str, compute_s: float, name: str) -> None:
    """Target: one worker connected to every broker, as a worker process given several ``--broker``; runs until SIGTERM."""
    import msgpack
    import numpy as np
    import zmq

    from zdepth import protocol
    from zdepth.protocol import codec
    from zdepth.protocol.auth import apply_peer_security

    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ctx = zmq.Context()
    socks = []
    poller = zmq.Poller()

    def ready(sock) -> None:
        sock.send_multipart([protocol.command("ready", key=key, models=["vits"], capacity=4, info={"name": name})])

    for endpoint in endpoints:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        apply_peer_security(sock, key=key, curve=None)
        sock.connect(endpoint)
        ready(sock)
        poller.register(sock, zmq.POLLIN)
        socks.append(sock)
    conn.send("ready")
    conn.close()
    held: list[tuple[float, int, dict[str, Any], bytes, bytes]] = []
    next_beat = 0.0
    while not stop:
        now = time.monotonic()
        if now >= next_beat:
            for sock in socks:
                sock.send_multipart([protocol.command("heartbeat")])
            next_beat = now + 0.5
        for index, sock in enumerate(socks):
            while sock.poll(0):
                frames = sock.recv_multipart()
                header = msgpack.unpackb(frames[0], raw=False)
                if header.get("cmd") == "request":
                    held.append((now + compute_s, index, header, frames[1], frames[2]))
                elif header.get("cmd") == "disconnect" and header.get("reason") == "unknown_worker":
                    held = [job for job in held if job[1] != index]
                    ready(sock)
        now = time.monotonic()
        for job in [job for job in held if job[0] <= now]:
            held.remove(job)
            _, index, header, params, image = job
            pixels = codec.decode_image_frame(codec.parse_params(header["op"], params).image, image)
            depth = np.ascontiguousarray(pixels[..., 0], dtype=np.float32)
            descs, buffers = codec.array_frames({"depth": depth})
            reply = protocol.reply_header(header["id"], arrays=descs, model=header["model"], worker=name, min=0.0, max=255.0, timings={})
            socks[index].send_multipart([protocol.command("reply", rid=header["rid"], status="ok"), reply, *buffers])
        wait_ms = 5 if not held else max(0, min(5, int((min(job[0] for job in held) - time.monotonic()) * 1000)))
        poller.poll(wait_ms)
    for sock in socks:
        sock.close(0)
    ctx.term()


def stream_main(conn, kind: str, addresses: list[str], key: str, timeout: float, pace_s: float, shape: tuple[int, int]) -> None:
    """Target: a client streaming frames until the parent says "stop"; then its records go back.

    A record per frame given back: (when, index, broker or None, error code or None, when submitted).
    """
    import asyncio

    import numpy as np

    from zdepth import AsyncClient, Client, DepthResult

    frame = np.zeros((*shape, 3), np.uint8)
    submitted: dict[int, float] = {}
    records: list[tuple[float, int, str | None, str | None, float]] = []

    def record(index: int, item: Any) -> None:
        ok = isinstance(item, DepthResult)
        records.append((time.monotonic(), index, item.broker if ok else None, None if ok else getattr(item, "code", type(item).__name__), submitted[index]))

    def stopping() -> bool:
        return conn.poll(0)

    def frames():
        index = 0
        while not stopping():
            submitted[index] = time.monotonic()
            yield frame
            index += 1
            time.sleep(pace_s)

    async def aframes():
        index = 0
        while not stopping():
            submitted[index] = time.monotonic()
            yield frame
            index += 1
            await asyncio.sleep(pace_s)

    async def run_async() -> None:
        async with AsyncClient(addresses, key=key, timeout=timeout, retries=RETRIES) as client:
            await client.health_all()
            conn.send("ready")
            position = 0
            async for item in client.stream(aframes(), max_in_flight=4, return_exceptions=True):
                record(position, item)
                position += 1

    if kind == "async":
        asyncio.run(run_async())
    else:
        with Client(addresses, key=key, timeout=timeout, retries=RETRIES) as client:
            client.health_all()  # both connections up first, so the first broker is the one chosen
            conn.send("ready")
            for position, item in enumerate(client.stream(frames(), max_in_flight=4, return_exceptions=True)):
                record(position, item)
    conn.recv()
    conn.send(records)
    conn.close()


def start_process(target, *args, name: str):
    ctx = _common.spawn_context()
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child, *args), daemon=True, name=name)
    process.start()
    child.close()
    if not parent.poll(120):
        process.kill()
        raise RuntimeError(f"{name} did not start")
    parent.recv()
    return process, parent


def kill(broker: _peers.SourceBroker) -> float:
    """kill -9; the time the signal went (nothing the broker relays can arrive after it)."""
    killed_at = time.monotonic()
    broker.popen.kill()
    broker.popen.wait(10)
    return killed_at


def analyse(records: list[tuple[float, int, str | None, str | None, float]], kills: list[tuple[float, str, str]], bound: float) -> dict[str, Any]:
    """Failover per kill, failures, frames lost or repeated, the slowest frame against the bound."""
    indices = [index for _, index, *_ in records]
    failovers = []
    for killed_at, _dead, other in kills:
        before = [at for at, *_ in records if at < killed_at]
        after = [at for at, _, broker, _, _ in records if at >= killed_at and broker == other]
        failovers.append((min(after) - max(before)) * 1000 if before and after else None)
    waits = [at - sent for at, _, _, _, sent in records]
    return {
        "frames": len(records),
        "failed": sum(1 for *_, error, _ in records if error is not None),
        "failure_codes": sorted({error for *_, error, _ in records if error is not None}),
        "lost_or_repeated": indices != list(range(len(records))),
        "failover_ms": failovers,
        "slowest_s": max(waits) if waits else None,
        "bound_s": bound,
    }


def run(args) -> dict[str, Any]:
    import zmq

    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="zdepth-failover-"))
    shape = parse_size(args.size)
    brokers = [_peers.start_source_broker(_common.ROOT, logs, key=KEY), _peers.start_source_broker(_common.ROOT, logs, key=KEY)]
    ctx = zmq.Context()
    workers, streams = [], []
    try:
        worker_endpoints = [broker.workers for broker in brokers]
        for n in range(args.workers):
            workers.append(start_process(worker_main, worker_endpoints, KEY, args.compute_ms / 1000, f"worker-{n}", name=f"worker-{n}"))
        for broker in brokers:
            _peers.wait_workers_ready(ctx, broker.clients, args.workers, key=KEY)
        addresses = [broker.clients for broker in brokers]
        kinds = [("sync", "async")[n % 2] for n in range(args.streams)]
        for n, kind in enumerate(kinds):
            streams.append(start_process(stream_main, kind, addresses, KEY, args.timeout, args.pace_ms / 1000, shape, name=f"stream-{n}-{kind}"))
        kills: list[tuple[float, str, str]] = []
        in_use = 0
        for round_ in range(args.rounds):
            time.sleep(args.settle)
            killed_at = kill(brokers[in_use])
            kills.append((killed_at, addresses[in_use], addresses[1 - in_use]))
            print(f"round {round_ + 1}: killed the broker at {addresses[in_use]}", flush=True)
            time.sleep(args.settle)
            brokers[in_use] = _peers.start_source_broker(_common.ROOT, logs, key=KEY, clients=addresses[in_use], workers=worker_endpoints[in_use])
            _peers.wait_workers_ready(ctx, addresses[in_use], args.workers, key=KEY, timeout=30)
            time.sleep(2.5)  # the clients reconnect within their longest back-off (2 s)
            in_use = 1 - in_use
        time.sleep(args.settle)
        per_stream = []
        for (process, pipe), kind in zip(streams, kinds):
            pipe.send("stop")
            records = pipe.recv() if pipe.poll(60) else []
            _common.stop_process(process)
            per_stream.append({"kind": kind, **analyse(records, kills, args.timeout * (RETRIES + 1))})
        streams = []
        return {"streams": per_stream, "rounds": args.rounds, "logs": str(logs)}
    finally:
        for process, pipe in streams:
            _common.stop_process(process)
        for process, _ in workers:
            _common.stop_process(process)
        for broker in brokers:
            broker.stop(signal.SIGKILL)
        ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="brokers killed, one after another")
    parser.add_argument("--streams", type=int, default=2, help="client streams (processes), sync and async alternating")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, each connected to both brokers")
    parser.add_argument("--compute-ms", type=float, default=10.0, help="a worker's time per request")
    parser.add_argument("--pace-ms", type=float, default=10.0, help="time between a stream's frames")
    parser.add_argument("--size", default="120x160", help="frame size HxW (the depth map comes back the same size)")
    parser.add_argument("--timeout", type=float, default=3.0, help="the clients' timeout per attempt (retries=1)")
    parser.add_argument("--settle", type=float, default=1.5, help="seconds of streaming before and after each kill")
    parser.add_argument("--logs", help="folder for the broker logs (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.settle = 1, 1.0
    machine = _common.machine_info(torch_info=False)
    print(_common.machine_line(machine))
    print(f"{args.streams} streams, {args.workers} workers, {args.rounds} rounds ...", flush=True)
    result = run(args)
    rows = []
    for stream in result["streams"]:
        gaps = [gap for gap in stream["failover_ms"] if gap is not None]
        stats = _common.summarize(gaps)
        rows.append({
            "stream": stream["kind"], "failovers": f"{len(gaps)} of {len(stream['failover_ms'])}",
            "failover p50 ms": stats.get("p50"), "failover max ms": stats.get("max"), "frames": stream["frames"],
            "failed": stream["failed"], "lost or repeated": "yes" if stream["lost_or_repeated"] else "none",
            "slowest frame s": stream["slowest_s"], "bound s": stream["bound_s"],
        })  # fmt: skip
    report = _common.Report()
    title = (
        f"Failover: kill -9 of the broker in use, {args.rounds} round(s); {args.streams} stream(s) of {args.size} frames every "
        f"{args.pace_ms:g} ms, {args.workers} worker(s) of {args.compute_ms:g} ms on both brokers; timeout {args.timeout:g} s, retries {RETRIES}"
    )
    report.table(rows, list(rows[0]), title=title)
    report.note("failover: from the last result a stream gave before the kill to the first it gave through the other broker")
    out = {"benchmark": NAME, "machine": machine, "report": report.parts, "config": vars(args), "results": result}
    _common.write_json(NAME, out, args.json)
    complete = all(
        s["failed"] == 0 and not s["lost_or_repeated"] and all(g is not None for g in s["failover_ms"]) for s in result["streams"]
    )
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
