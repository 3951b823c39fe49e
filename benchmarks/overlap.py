"""Does the worker keep its device busy? The real broker and Worker with a stub engine, on the CPU.

The stub engine stands in for a GPU: each forward pass takes a fixed time
(``--forward-ms`` per batch plus ``--per-image-ms`` per image) during which it
holds no lock, like a CUDA kernel that the host merely waits for (it sleeps).
Everything else is real: client streams (one process each, a ``zdepth.Client``
sending JPEG frames one after another), the broker process, and the worker
process decoding JPEGs, batching, building and sending replies. The engine
records when each forward pass starts and ends; reported is its busy time over
the wall time while all streams run, with the worker's pipeline on and off
side by side (``WorkerConfig.pipeline``: off is one compute thread that
decodes, runs and replies in turn).

    python benchmarks/overlap.py [--quick] [--json out.json]
    python benchmarks/overlap.py --streams 8 --forward-ms 5 --per-image-ms 1 --size 480x640

The defaults (5 ms a batch plus 1 ms an image, 240x320 frames) are a GPU's
proportions scaled to a small machine: with 480x640 frames on 2 cores, the
client processes, the broker and the worker's decoding together need more
CPU than there is, and the host, not the overlap, sets the pace.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import _common
import _peers
import serving

NAME = "overlap"
KEY = serving.KEY


class SleepEngine:
    """An engine whose forward pass is a sleep (the GIL released, as while a GPU computes); depth is zeros."""

    device = "stub"
    precision = "stub"
    cuda_graphs = decodes_jpeg = staged = False  # what zdepth.worker.engine.Engine asks of every engine

    def __init__(self, forward_s: float, per_image_s: float) -> None:
        self.forward_s, self.per_image_s = forward_s, per_image_s
        self.intervals: list[tuple[float, float, int]] = []  # (start, end, batch size), time.monotonic()

    def load(self, model_id: str) -> None:
        return None

    def infer(self, images, model_id, *, input_size=518, max_depth=None):
        import numpy as np

        start = time.monotonic()
        time.sleep(self.forward_s + self.per_image_s * len(images))
        end = time.monotonic()
        self.intervals.append((start, end, len(images)))
        return [np.zeros(image.shape[:2], np.float32) for image in images]


def sleep_worker(conn, endpoint: str, options: dict[str, Any]) -> None:
    """The real Worker with a SleepEngine; on SIGTERM it drains, then sends the engine's intervals."""
    from zdepth.config import WorkerConfig
    from zdepth.worker import Worker

    engine = SleepEngine(options.pop("forward_ms") / 1000, options.pop("per_image_ms") / 1000)
    config = WorkerConfig(broker=endpoint, models=("vits",), key=KEY, warmup_sizes=(), **options)
    worker = Worker(config, engine=engine)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    conn.send("ready")
    worker.run()
    conn.send(engine.intervals)
    conn.close()


def busy_fraction(intervals: list[tuple[float, float, int]], start: float, end: float) -> tuple[float, int, float]:
    """(busy time / (end - start), batches, mean batch size) for the forward passes within [start, end]."""
    busy, sizes = 0.0, []
    for begin, finish, size in intervals:
        overlap = min(finish, end) - max(begin, start)
        if overlap > 0:
            busy += overlap
            sizes.append(size)
    return busy / (end - start), len(sizes), (sum(sizes) / len(sizes) if sizes else 0.0)


def run_case(args, streams: int, pipeline: bool, frame: bytes) -> dict[str, Any]:
    broker, clients, workers = _common.start_broker(KEY)
    worker = None
    try:
        options = {"forward_ms": args.forward_ms, "per_image_ms": args.per_image_ms, "max_batch": args.max_batch, "pipeline": pipeline}
        worker, pipe = _peers.launch(sleep_worker, workers, options, name="overlap-worker")
        _peers.wait(worker, pipe)
        _common.wait_for_workers(clients, KEY, 1, timeout=60)
        stream_options = {
            "encoder": "vits",
            "input_size": 518,
            "wire_format": "raw",
            "timeout": 30.0,
            "warmup": args.warmup,
            "duration": args.duration,
            "in_flight": 1,
        }
        result = serving.run_streams(clients, streams, stream_options, frame)
        worker.terminate()  # drains, then reports the engine's intervals
        if not pipe.poll(30):
            raise RuntimeError("the worker did not report its engine's intervals")
        intervals = pipe.recv()
    finally:
        _common.stop_process(worker)
        _common.stop_process(broker)
    start = result["started_at"]
    busy, batches, mean_batch = busy_fraction(intervals, start, start + args.duration)
    return {"streams": streams, "pipeline": pipeline, "busy": busy, "batches": batches, "mean_batch": mean_batch, **result}


def main() -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,8", help="comma-separated numbers of concurrent client streams")
    parser.add_argument("--forward-ms", type=float, default=5.0, help="the stub's forward pass per batch")
    parser.add_argument("--per-image-ms", type=float, default=1.0, help="and per image in the batch")
    parser.add_argument("--size", default="240x320", help="frame HxW, sent as a JPEG")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds each configuration runs")
    parser.add_argument("--warmup", type=int, default=3, help="requests per stream before timing")
    parser.add_argument("--pipeline", default="off,on", help="worker pipeline settings to compare, in order")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.streams = 1.0, 1, "2"
    height, width = (int(n) for n in args.size.lower().split("x"))
    stream_counts = [int(n) for n in args.streams.split(",") if n.strip()]
    pipelines = [{"on": True, "off": False}[p.strip()] for p in args.pipeline.split(",") if p.strip()]

    machine = _common.machine_info(torch_info=False)
    print(f"overlap: stub forward {args.forward_ms:g} ms + {args.per_image_ms:g} ms/image, {height}x{width} JPEG frames, streams {stream_counts}")
    print(_common.machine_line(machine))
    frame = _common.jpeg_bytes(_common.frames_bgr(1, (height, width))[0])

    runs = []
    for streams in stream_counts:
        for pipeline in pipelines:
            run = run_case(args, streams, pipeline, frame)
            runs.append(run)
            print(f"  streams={streams} pipeline={'on' if pipeline else 'off'}: busy {run['busy']:.1%}, {run['fps']:.1f} fps, "
                  f"p50 {run['latency'].get('p50', float('nan')):.1f} ms, mean batch {run['mean_batch']:.2f} ({run['errors']} errors)", flush=True)  # fmt: skip

    report = _common.Report()
    rows = []
    for run in runs:
        base = next((r for r in runs if r["streams"] == run["streams"] and not r["pipeline"]), None)
        rows.append({
            "streams": run["streams"],
            "pipeline": "on" if run["pipeline"] else "off",
            "engine busy": f"{run['busy']:.1%}",
            "fps": run["fps"],
            "fps vs off": _common.ratio(run["fps"], base["fps"]) if base else None,
            "p50 ms": run["latency"].get("p50"),
            "p99 ms": run["latency"].get("p99"),
            "batches": run["batches"],
            "mean batch": run["mean_batch"],
            "errors": run["errors"],
        })  # fmt: skip
    title = f"Engine busy over wall time: stub forward {args.forward_ms:g} ms/batch + {args.per_image_ms:g} ms/image, {height}x{width} JPEG, {args.duration:g} s each"
    report.table(rows, list(rows[0]), title=title)
    report.note("Target: at least 90% busy at eight streams with the pipeline on. The stub sleeps through its forward pass, as a host thread waits for a GPU.")
    result = {"benchmark": NAME, "machine": machine, "report": report.parts, "config": dict(vars(args)), "runs": runs}
    _common.write_json(NAME, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
