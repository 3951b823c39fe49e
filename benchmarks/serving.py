"""Serving end to end: N client streams x M workers with the real model, through the real broker.

Each stream is a camera: a process with its own ``zdepth.Client`` that sends
480x640 frames one after another (the next when the last reply is in; with
``--in-flight K`` it keeps K out through ``Client.stream``). All streams start
together after a warm-up and run for ``--duration`` seconds. Reported: frames
per second (all streams together), round-trip latency p50/p90/p99 from the
client's view, and the worker's own timings (queue, batch inference, receipt
to reply) so the client-side overhead can be read off.

Inputs, side by side (``--inputs``):

  jpeg      the frame as JPEG bytes (encoded once beforehand, as a camera or a
            file gives them), sent as they are; the worker decodes
  raw       a BGR array, ``wire_format="raw"``: 921,600 bytes of pixels on the wire
  raw-jpeg  a BGR array, ``wire_format="jpeg"``: the client encodes (quality 90)
            and the worker decodes: the question whether JPEG-encoding raw
            frames on the client pays off end to end

``raw`` and ``raw-jpeg`` run for the first encoder at the first stream count;
``--compare-max-wait MS`` also runs the first encoder with workers whose
batches wait MS (instead of ``--max-wait-ms``) for company.

The real broker runs in one process, each worker in another (``WorkerConfig``
defaults unless given), streams in their own processes.

    python benchmarks/serving.py [--quick] [--json out.json]
    python benchmarks/serving.py --device cuda --encoders vits,vitb,vitl --input-size 518 --streams 1,8
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import _common
import _peers

NAME = "serving"
KEY = "bench-key"


# ----------------------------------------------------------------------------- one stream


def run_stream(conn, address: str, options: dict[str, Any], frame, start_event) -> None:
    """A client stream process: warm up, wait for the start, send frames until the deadline, report."""
    from zdepth.client import Client

    samples: list[float] = []
    server: dict[str, float] = {"queue_ms": 0.0, "infer_ms": 0.0, "worker_ms": 0.0}
    errors = 0
    client = Client(address, key=KEY, timeout=options["timeout"], retries=0, encoder=options["encoder"], wire_format=options["wire_format"], input_size=options["input_size"])
    try:
        for _ in range(options["warmup"]):
            client.relative_depth(frame)
        conn.send("warm")
        start_event.wait()
        deadline = time.monotonic() + options["duration"]
        clock = time.perf_counter_ns
        if options["in_flight"] <= 1:
            while time.monotonic() < deadline:
                start = clock()
                try:
                    result = client.relative_depth(frame)
                except Exception:
                    errors += 1
                    continue
                samples.append((clock() - start) / 1e6)
                for name in server:
                    server[name] += result.timings.get(name, 0.0)
        else:

            def frames():
                while time.monotonic() < deadline:
                    yield frame

            for result in client.stream(frames(), max_in_flight=options["in_flight"], return_exceptions=True):
                if isinstance(result, Exception):
                    errors += 1
                    continue
                samples.append(result.timings["round_trip_ms"])
                for name in server:
                    server[name] += result.timings.get(name, 0.0)
        elapsed = options["duration"] + max(0.0, time.monotonic() - deadline)
        conn.send({"samples": samples, "server": server, "errors": errors, "elapsed": elapsed})
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        client.close()


def run_streams(address: str, streams: int, options: dict[str, Any], frame) -> dict[str, Any]:
    """``streams`` client processes against ``address``; all start together once warm."""
    ctx = _common.spawn_context()
    start_event = ctx.Event()
    procs, pipes = [], []
    for i in range(streams):
        parent, child = ctx.Pipe(duplex=False)
        process = ctx.Process(target=run_stream, args=(child, address, options, frame, start_event), daemon=True, name=f"stream-{i}")
        process.start()
        child.close()
        procs.append(process)
        pipes.append(parent)
    try:
        for pipe in pipes:
            if not pipe.poll(options["timeout"] * (options["warmup"] + 2) + 60):
                raise RuntimeError("a client stream did not warm up in time")
            message = pipe.recv()
            if message != "warm":
                raise RuntimeError(f"a client stream failed while warming up: {message}")
        started_at = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process of this machine
        start_event.set()
        reports = []
        for pipe in pipes:
            if not pipe.poll(options["duration"] + options["timeout"] + 60):
                raise RuntimeError("a client stream did not report")
            reports.append(pipe.recv())
    finally:
        for process in procs:
            process.join(10)
            _common.stop_process(process)
    failed = [r["error"] for r in reports if "error" in r]
    if failed:
        raise RuntimeError(f"client streams failed: {failed}")
    samples = [s for r in reports for s in r["samples"]]
    frames = len(samples)
    elapsed = max(r["elapsed"] for r in reports)
    server = {name: sum(r["server"][name] for r in reports) / frames if frames else None for name in ("queue_ms", "infer_ms", "worker_ms")}
    return {
        "frames": frames,
        "errors": sum(r["errors"] for r in reports),
        "elapsed_s": elapsed,
        "fps": frames / elapsed,
        "latency": _common.summarize(samples),
        "server_mean": server,
        "started_at": started_at,
    }


# ----------------------------------------------------------------------------- servers


def model_worker(conn, endpoint: str, key: str | None, options: dict) -> None:
    """The real Worker and Engine; ``options`` are WorkerConfig fields (``threads`` None: the worker's choice)."""
    import signal

    from zdepth.config import WorkerConfig
    from zdepth.worker import Worker

    worker = Worker(WorkerConfig(broker=endpoint, key=key, **options))
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    conn.send("ready")
    conn.close()
    worker.run()


def start_servers(encoder: str, args, weights_dir: Path, max_wait_ms: float, cuda_graphs: bool = False) -> tuple[list, str]:
    broker, clients, workers = _common.start_broker(KEY)
    processes = [broker]
    try:
        for index in range(args.workers):
            device = args.device if args.device != "cuda" else f"cuda:{index % max(1, args.gpus)}"
            options = {
                "models": (encoder,),
                "device": device,
                "precision": args.precision,
                "weights_dir": str(weights_dir),
                "compile": args.compile,
                "cuda_graphs": cuda_graphs,
                "gpu_decode": args.gpu_decode,
                "max_batch": args.max_batch,
                "max_wait_ms": max_wait_ms,
                # On CUDA the worker warms up before READY, as in production; on the CPU at 518
                # that would take long, and warm_input_size() warms the size measured anyway.
                "warmup_sizes": ((480, 640),) if args.device.startswith("cuda") else (),
                "threads": args.threads,
                "pipeline": args.pipeline == "on",
            }
            process, _ = _peers.start(model_worker, workers, KEY, options, name=f"worker-{index}")
            processes.append(process)
        _common.wait_for_workers(clients, KEY, args.workers, timeout=args.startup_timeout, model=encoder)
    except BaseException:
        for process in reversed(processes):
            _common.stop_process(process)
        raise
    return processes, clients


def warm_input_size(address: str, encoder: str, input_size: int, frame, rounds: int, timeout: float) -> None:
    """First requests at a new input size pay one-time costs (allocator, cuDNN, compile): pay them here."""
    from zdepth.client import Client

    with Client(address, key=KEY, timeout=timeout, retries=0, encoder=encoder, input_size=input_size) as client:
        for _ in range(rounds):
            client.relative_depth(frame)


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", default="vits", help="comma-separated: vits, vitb, vitl")
    parser.add_argument("--input-size", type=int, default=None, help="network input size (default 518 on CUDA, 182 on the CPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--gpus", type=int, default=1, help="workers go round-robin over this many GPUs")
    parser.add_argument("--precision", default=None, help="fp32, fp16, bf16 (default: the engine's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in the workers")
    parser.add_argument("--cuda-graphs", action="store_true", help="run every worker with CUDA graphs")
    parser.add_argument("--compare-cuda-graphs", action="store_true", help="also run every encoder's workers with CUDA graphs (jpeg input, every stream count)")
    parser.add_argument("--gpu-decode", action="store_true", help="workers decode JPEGs with nvjpeg (WorkerConfig.gpu_decode)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--streams", default="1,8", help="comma-separated numbers of concurrent client streams")
    parser.add_argument("--inputs", default="jpeg", help="comma-separated: jpeg, raw, raw-jpeg (see above)")
    parser.add_argument("--wire-compare", default="raw,raw-jpeg", help="inputs also run at the first --streams value ('' for none)")
    parser.add_argument("--in-flight", type=int, default=1, help="requests each stream keeps out (>1 uses Client.stream)")
    parser.add_argument("--duration", type=float, default=None, help="seconds each configuration runs (default 10 on CUDA, 30 on the CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="requests per stream before timing")
    parser.add_argument("--max-batch", type=int, default=None, help="WorkerConfig.max_batch (default: 8 on CUDA, the worker's choice on the CPU)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="WorkerConfig.max_wait_ms: how long a partial batch waits for company (0, the default, as in production)")
    parser.add_argument("--compare-max-wait", type=float, default=None, help="also run the first encoder's workers with this max_wait_ms (jpeg input, every stream count)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default: the worker's own choice, zdepth.worker.cpu_plan)")
    parser.add_argument("--pipeline", default="on", choices=("on", "off"), help="WorkerConfig.pipeline")
    parser.add_argument("--weights-dir", default=None, help="a weights dir (real checkpoints); missing files are generated there (golden vits if reachable, else random weights)")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request, s")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    args = parser.parse_args()

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.input_size is None:
        args.input_size = 518 if cuda else 182
    if args.duration is None:
        args.duration = 10.0 if cuda else 30.0
    if args.quick:
        args.duration, args.warmup = 1.0, 1
        if not cuda:
            args.input_size = min(args.input_size, 70)
            args.streams = ",".join(args.streams.split(",")[:1]) if args.streams else "1"
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    stream_counts = [int(n) for n in args.streams.split(",") if n.strip()]
    inputs = [i.strip() for i in args.inputs.split(",") if i.strip()]
    compare = [i.strip() for i in args.wire_compare.split(",") if i.strip() and i.strip() not in inputs]
    for name in inputs + compare:
        if name not in ("jpeg", "raw", "raw-jpeg"):
            parser.error(f"unknown input {name!r}; use jpeg, raw or raw-jpeg")

    report = _common.Report()
    machine = _common.machine_info()
    print(f"serving: {','.join(encoders)} at input {args.input_size} on {args.device}, {args.workers} worker(s), streams {stream_counts}")
    print(_common.machine_line(machine))

    bgr = _common.frames_bgr(1)[0]
    jpeg = _common.jpeg_bytes(bgr)
    frames = {"jpeg": jpeg, "raw": bgr, "raw-jpeg": bgr}
    wire = {"jpeg": "raw", "raw": "raw", "raw-jpeg": "jpeg"}

    weights_dir, weights_source = _common.prepare_weights(args.weights_dir, encoders)

    # (encoder, max_wait_ms, cuda_graphs, [(streams, input), ...]): one worker set each.
    setups = []
    for index, encoder in enumerate(encoders):
        plan = [(n, i) for n in stream_counts for i in inputs]
        if index == 0:
            plan += [(stream_counts[0], i) for i in compare]
        graphs = args.cuda_graphs and cuda
        setups.append((encoder, args.max_wait_ms, graphs, plan))
        if index == 0 and args.compare_max_wait is not None:
            setups.append((encoder, args.compare_max_wait, graphs, [(n, inputs[0]) for n in stream_counts]))
        if args.compare_cuda_graphs and cuda and not graphs:
            setups.append((encoder, args.max_wait_ms, True, [(n, inputs[0]) for n in stream_counts]))

    runs: list[dict[str, Any]] = []
    for encoder, max_wait_ms, graphs, plan in setups:
        started = time.monotonic()
        processes, address = start_servers(encoder, args, weights_dir, max_wait_ms, graphs)
        startup_s = time.monotonic() - started
        try:
            warm_input_size(address, encoder, args.input_size, jpeg, 2 if args.quick else 5, args.timeout)
            for streams, input_name in plan:
                options = {
                    "encoder": encoder,
                    "input_size": args.input_size,
                    "wire_format": wire[input_name],
                    "timeout": args.timeout,
                    "warmup": args.warmup,
                    "duration": args.duration,
                    "in_flight": args.in_flight,
                }
                result = run_streams(address, streams, options, frames[input_name])
                run = {"encoder": encoder, "input": input_name, "streams": streams, "workers": args.workers, "max_wait_ms": max_wait_ms, "cuda_graphs": graphs, "startup_s": startup_s, **result}
                runs.append(run)
                partial = {"benchmark": NAME, "partial": True, "machine": machine, "weights": weights_source, "config": dict(vars(args)), "runs": runs}
                _common.write_json(NAME, partial, args.json, quiet=True)
                lat = result["latency"]
                setting = f"{encoder} {input_name:8s} streams={streams} max_wait={max_wait_ms:g}{' graphs' if graphs else ''}"
                figures = f"{result['fps']:.1f} fps, p50 {lat.get('p50', float('nan')):.2f} ms, p99 {lat.get('p99', float('nan')):.2f} ms"
                print(f"  {setting}: {figures} ({result['frames']} frames, {result['errors']} errors)", flush=True)
        finally:
            for process in reversed(processes):
                _common.stop_process(process)

    rows = []
    for run in runs:
        same = (r for r in runs if r["encoder"] == run["encoder"] and r["streams"] == run["streams"])
        base = next((r for r in same if r["input"] == "jpeg" and r["max_wait_ms"] == args.max_wait_ms and not r["cuda_graphs"]), None)
        lat, srv = run["latency"], run["server_mean"]
        rows.append({
            "model": run["encoder"],
            "input": run["input"],
            "streams": run["streams"],
            "max wait ms": run["max_wait_ms"],
            "cuda graphs": "yes" if run["cuda_graphs"] else "no",
            "fps": run["fps"],
            "p50 ms": lat.get("p50"),
            "p90 ms": lat.get("p90"),
            "p99 ms": lat.get("p99"),
            "worker ms": srv["worker_ms"],
            "infer ms (batch)": srv["infer_ms"],
            "client+transport ms": None if lat.get("mean") is None or srv["worker_ms"] is None else lat["mean"] - srv["worker_ms"],
            "p50 vs base": _common.ratio(lat.get("p50"), base["latency"].get("p50")) if base else None,
            "errors": run["errors"],
        })
    title = f"Through the broker: 480x640 frames, input {args.input_size}, {args.device}, {args.workers} worker(s), {args.duration:.0f} s each"
    report.table(rows, list(rows[0]), title=title)
    report.note(
        "client+transport ms = mean round trip - mean worker_ms (receipt to reply in the worker): broker, sockets, client encode/decode. "
        f"p50 vs base: against jpeg input at the same stream count with max_wait {args.max_wait_ms:g} ms."
    )

    targets = {}
    if cuda:
        goals = {("vits", 1): ("p50", 4.0), ("vitl", 1): ("p50", 11.0), ("vits", 8): ("fps", 800.0), ("vitl", 8): ("fps", 200.0)}
        for run in runs:
            goal = goals.get((run["encoder"], run["streams"]))
            if goal and run["input"] == "jpeg" and args.input_size == 518 and run["max_wait_ms"] == args.max_wait_ms:
                metric, limit = goal
                value = run["latency"]["p50"] if metric == "p50" else run["fps"]
                met = value <= limit if metric == "p50" else value >= limit
                graphs = " (CUDA graphs)" if run["cuda_graphs"] else ""
                targets[f"{run['encoder']} {run['streams']} stream(s) {metric}{graphs}"] = {"value": value, "target": limit, "met": met}
        if targets:
            report.table([{"goal": k, **v} for k, v in targets.items()], ["goal", "value", "target", "met"], title="Targets (one GPU)")

    result = {
        "benchmark": NAME,
        "machine": machine,
        "report": report.parts,
        "weights": weights_source,
        "config": {k: v for k, v in vars(args).items()},
        "frame": {"shape": list(bgr.shape), "jpeg_bytes": len(jpeg), "raw_bytes": int(bgr.nbytes)},
        "runs": runs,
        "targets": targets,
    }
    _common.write_json(NAME, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
