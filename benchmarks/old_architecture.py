"""The CPU side by side: zdepth against the old server's architecture, same weights, same frames, one run.

The old architecture is the HTTP server zdepth replaces: FastAPI + uvicorn, the
image base64 in JSON, the official per-image path (``preprocess_cv2``, the fp32
model, ``resize_depth``) run in FastAPI's thread pool with torch's default
threads, the depth map base64 float32 in JSON (``_http_server.py --weights``).
zdepth is what ``zdepth serve`` starts on this box: ``zdepth broker`` and its
CPU workers as processes (``zdepth.worker.cpu.cpu_workers``; ``--workers`` and
``--threads`` to choose), and ``zdepth.Client`` sending the JPEG bytes as they are. Both get 480x640 JPEG frames of the test
photos, from client threads in this process (one or ``--streams`` at once,
each sending its next frame when its last reply is in).

Reported, each configuration in ``--rounds`` interleaved rounds of
``--seconds``: frames/s and round-trip p50/p90, the ratio zdepth / old at each
stream count, and ``Engine.infer`` alone (cv2 decode + infer, in a process of
its own with the threads the worker chose) against zdepth's single stream. The
targets: zdepth >= 1.5x the old frames/s at two streams; zdepth's single-stream
p50 within 1.3x of ``Engine.infer`` alone.

    python benchmarks/old_architecture.py [--quick] [--input-size 140] [--seconds 20] [--rounds 2]
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import _common

NAME = "old_architecture"
KEY = "bench-key"
MODEL = "vits"


# ----------------------------------------------------------------------------- the two systems


def start_old_server(weights: Path, input_size: int) -> tuple[subprocess.Popen, str]:
    """The old architecture in its own process; returns it and its /rel_depth URL once /health answers."""
    port = _common.free_port()
    process = subprocess.Popen(
        [sys.executable, str(_common.HERE / "_http_server.py"), "--port", str(port), "--key", KEY,
         "--weights", str(weights / f"depth_anything_v2_{MODEL}.pth"), "--encoder", MODEL, "--input-size", str(input_size)],
    )
    return process, _common.wait_http(process, port, timeout=120.0)


def start_zdepth(weights: Path, logs: Path, workers_count: int = 1, threads: int | None = None) -> tuple[list[subprocess.Popen], str, dict[str, Any]]:
    """``zdepth broker`` and ``zdepth worker --device cpu`` processes as a user starts them (the worker's own CPU
    plan unless ``threads``); returns them, the client address and the first worker's health entry once all are ready."""
    clients, workers = f"tcp://127.0.0.1:{_common.free_port()}", f"tcp://127.0.0.1:{_common.free_port()}"
    env = {**os.environ, "ZDEPTH_KEY": KEY, "PYTHONPATH": _common.checkout_pythonpath()}
    env.pop("OMP_NUM_THREADS", None)  # the worker's own CPU plan, as a user gets it
    zdepth = [sys.executable, "-m", "zdepth"]
    processes = [subprocess.Popen([*zdepth, "broker", "--clients", clients, "--workers", workers], env=env, stderr=open(logs / "broker.log", "w"))]
    extra = ["--threads", str(threads)] if threads else []
    for i in range(workers_count):
        processes.append(subprocess.Popen([*zdepth, "worker", "--broker", workers, "--device", "cpu", "-m", MODEL, "--weights-dir", str(weights), *extra],
                                          env=env, stderr=open(logs / f"worker{i}.log", "w")))
    try:
        health = _common.wait_for_workers(clients, KEY, workers_count, timeout=300, model=MODEL)
    except BaseException:
        stop(processes)
        raise
    return processes, clients, health["workers"][0]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in reversed(processes):
        process.terminate()
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def old_caller(url: str) -> Callable[[bytes], Any]:
    """The old client's way: base64 the JPEG into JSON, POST, parse the JSON, base64-decode the depth."""
    import numpy as np
    import requests

    session = requests.Session()
    headers = {"Authorization": f"Bearer {KEY}"}

    def call(jpeg: bytes) -> Any:
        payload = {"image": base64.b64encode(jpeg).decode("ascii"), "encoder": MODEL, "dataset": "hypersim", "model_input_size": 518}
        response = session.post(url, json=payload, headers=headers, timeout=60)
        response.raise_for_status()
        body = response.json()
        return np.frombuffer(base64.b64decode(body["depth_map"]), dtype=np.float32).reshape(body["shape"])

    return call


def zdepth_caller(address: str, input_size: int) -> Callable[[bytes], Any]:
    from zdepth.client import Client

    client = Client(address, key=KEY, timeout=60.0, retries=0, encoder=MODEL, input_size=input_size)
    return lambda jpeg: client.relative_depth(jpeg).depth


# ----------------------------------------------------------------------------- measuring


def run_streams(make_caller: Callable[[], Callable[[bytes], Any]], frames: list[bytes], streams: int, seconds: float, warmup: int) -> dict[str, Any]:
    """``streams`` threads, each with its own caller, sending frames back to back for ``seconds`` after a warm-up."""
    callers = [make_caller() for _ in range(streams)]
    for call in callers:
        for i in range(warmup):
            call(frames[i % len(frames)])
    samples: list[list[float]] = [[] for _ in range(streams)]
    errors: list[str] = []
    start = threading.Barrier(streams + 1)
    deadline = [0.0]

    def stream(index: int) -> None:
        call, mine = callers[index], samples[index]
        start.wait()
        i = index
        while time.monotonic() < deadline[0]:
            began = time.perf_counter()
            try:
                call(frames[i % len(frames)])
            except Exception as exc:  # counted and shown, never hidden
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            mine.append((time.perf_counter() - began) * 1000)
            i += 1

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    deadline[0] = time.monotonic() + seconds
    began = time.monotonic()
    start.wait()
    for thread in threads:
        thread.join(seconds + 120)
    elapsed = time.monotonic() - began
    flat = [s for per in samples for s in per]
    return {"frames": len(flat), "elapsed_s": elapsed, "fps": len(flat) / elapsed, "latency": _common.summarize(flat), "errors": errors[:3], "error_count": len(errors)}


ENGINE_ALONE = r"""
import json, sys, time
import torch
from zdepth.engine import Engine
from zdepth.protocol.images import decode_image
weights, threads, input_size, seconds, warmup, paths = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6:]
torch.set_num_threads(threads)
frames = [open(p, "rb").read() for p in paths]
engine = Engine(device="cpu", weights_dir=weights)
engine.load("vits")
call = lambda jpeg: engine.infer([decode_image(jpeg)], "vits", input_size=input_size)[0]
for i in range(warmup):
    call(frames[i % len(frames)])
samples, i, deadline = [], 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    began = time.perf_counter()
    call(frames[i % len(frames)])
    samples.append((time.perf_counter() - began) * 1000)
    i += 1
print(json.dumps(samples))
"""


def engine_alone(weights: Path, threads: int, input_size: int, seconds: float, warmup: int, frame_files: list[Path]) -> dict[str, Any]:
    """``Engine.infer`` from JPEG bytes (cv2 decode + infer) back to back, in a process of its own with ``threads``."""
    import json

    env = {**os.environ, "PYTHONPATH": _common.checkout_pythonpath()}
    out = subprocess.run(
        [sys.executable, "-c", ENGINE_ALONE, str(weights), str(threads), str(input_size), str(seconds), str(warmup), *map(str, frame_files)],
        env=env, capture_output=True, text=True, timeout=seconds + 300, check=True,
    ).stdout
    samples = json.loads(out.strip().splitlines()[-1])
    return {"frames": len(samples), "fps": 1000 / (sum(samples) / len(samples)), "latency": _common.summarize(samples)}


# ----------------------------------------------------------------------------- main


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one configuration: frames/s over all rounds; latency percentiles of the rounds' p50/p90 (median)."""
    frames = sum(r["frames"] for r in runs)
    elapsed = sum(r.get("elapsed_s", 0.0) for r in runs)
    p50 = sorted(r["latency"]["p50"] for r in runs)[len(runs) // 2]
    p90 = sorted(r["latency"]["p90"] for r in runs)[len(runs) // 2]
    fps = frames / elapsed if elapsed else sorted(r["fps"] for r in runs)[len(runs) // 2]
    return {"frames": frames, "fps": fps, "p50": p50, "p90": p90, "per_round_fps": [r["fps"] for r in runs], "errors": sum(r.get("error_count", 0) for r in runs)}


def main() -> None:
    parser = _common.base_parser(__doc__)
    parser.add_argument("--input-size", type=int, default=140, help="network input side (default 140: the build machine's setting)")
    parser.add_argument("--streams", type=int, default=2, help="client streams for the throughput comparison (default 2)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per configuration per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the configurations interleaved in each")
    parser.add_argument("--weights-dir", default=None, help="a folder with depth_anything_v2_vits.pth (generated there if missing)")
    parser.add_argument("--workers", type=int, default=None, help="zdepth CPU workers (default: as many as zdepth serve starts on this box)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per zdepth worker (default: as zdepth serve gives them)")
    args = parser.parse_args()
    warmup = 3
    if args.quick:
        args.seconds, args.rounds, args.input_size, warmup = 1.0, 1, 70, 1

    import cv2

    machine = _common.machine_info()
    print(f"old architecture vs zdepth: {MODEL}, input {args.input_size}, 480x640 JPEG frames, 1 and {args.streams} streams, "
          f"{args.rounds} round(s) of {args.seconds:.0f} s each")
    print(_common.machine_line(machine))
    weights, weights_source = _common.prepare_weights(args.weights_dir, [MODEL])
    frames = [_common.jpeg_bytes(frame) for frame in _common.frames_bgr(2)]
    scratch = Path(tempfile.mkdtemp(prefix="zdepth-old-architecture-"))
    frame_files = []
    for i, jpeg in enumerate(frames):
        frame_files.append(scratch / f"frame{i}.jpg")
        frame_files[-1].write_bytes(jpeg)
    assert all(cv2.imdecode(__import__("numpy").frombuffer(f, "uint8"), cv2.IMREAD_COLOR) is not None for f in frames)

    from zdepth.worker.cpu import cpu_workers

    if args.workers is None:  # what `zdepth serve` starts on a CPU-only box
        args.workers, planned = cpu_workers()
        args.threads = args.threads or (planned if args.workers > 1 else None)
    old_process, old_url = start_old_server(weights, args.input_size)
    zdepth_processes, address, worker = start_zdepth(weights, scratch, args.workers, args.threads)
    threads = int(worker.get("info", {}).get("threads") or 1)
    print(f"zdepth: {args.workers} worker(s), {threads} torch thread(s) each; logs in {scratch}")
    stream_counts = sorted({1, args.streams})
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for round_index in range(args.rounds):
            for streams in stream_counts:
                for system, make in (("old", lambda: old_caller(old_url)), ("zdepth", lambda: zdepth_caller(address, args.input_size))):
                    result = run_streams(make, frames, streams, args.seconds, warmup)
                    runs.setdefault(f"{system}@{streams}", []).append(result)
                    print(f"  round {round_index + 1}: {system:6s} {streams} stream(s): {result['fps']:.2f} frames/s, p50 {result['latency'].get('p50', float('nan')):.1f} ms"
                          + (f", {result['error_count']} errors: {result['errors']}" if result["error_count"] else ""), flush=True)
    finally:
        old_process.terminate()
        old_process.wait(15)
        stop(zdepth_processes)
    # Engine.infer alone, with the servers gone, in the process setting the worker chose.
    runs["engine@1"] = [engine_alone(weights, threads, args.input_size, args.seconds, warmup, frame_files) for _ in range(args.rounds)]

    merged = {name: merge(results) for name, results in runs.items()}
    rows = []
    for streams in stream_counts:
        old, new = merged[f"old@{streams}"], merged[f"zdepth@{streams}"]
        rows.append({"streams": streams, "old frames/s": old["fps"], "zdepth frames/s": new["fps"], "zdepth / old": _common.ratio(new["fps"], old["fps"]),
                     "old p50 ms": old["p50"], "zdepth p50 ms": new["p50"], "old p90 ms": old["p90"], "zdepth p90 ms": new["p90"]})
    engine, single = merged["engine@1"], merged["zdepth@1"]
    target_rows = [
        {"target": f"zdepth >= 1.5x the old frames/s at {args.streams} streams", "measured": _common.ratio(merged[f"zdepth@{args.streams}"]["fps"], merged[f"old@{args.streams}"]["fps"]),
         "met": _common.ratio(merged[f"zdepth@{args.streams}"]["fps"], merged[f"old@{args.streams}"]["fps"]) >= 1.5},
        {"target": "zdepth single-stream p50 <= 1.3x Engine.infer alone", "measured": _common.ratio(single["p50"], engine["p50"]), "met": _common.ratio(single["p50"], engine["p50"]) <= 1.3},
    ]
    report = _common.Report()
    report.table(rows, list(rows[0]), title=f"Old architecture vs zdepth, {MODEL} at input {args.input_size}, 480x640 JPEG frames, CPU")
    report.table([{"path": "Engine.infer alone (cv2 decode + infer)", "threads": threads, "p50 ms": engine["p50"], "p90 ms": engine["p90"]},
                              {"path": "zdepth.Client through broker + worker", "threads": threads, "p50 ms": single["p50"], "p90 ms": single["p90"]}],
                 ["path", "threads", "p50 ms", "p90 ms"], title="One stream: the round trip against the engine alone")
    report.table(target_rows, ["target", "measured", "met"], title="Targets")
    _common.write_json(NAME, {"benchmark": NAME, "machine": machine, "weights": weights_source, "args": vars(args), "threads": threads, "runs": runs, "merged": merged,
                              "rows": rows, "targets": target_rows, "report": report.parts}, args.json)


if __name__ == "__main__":
    main()
