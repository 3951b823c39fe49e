"""Gateway: what the old HTTP API costs per 480x640 frame, next to zdepth.Client straight to the broker.

Every path sends the same 480x640 JPEG and gets the same 480x640 float32
depth map back from the same worker; only the way there differs:

  direct-metric    zdepth.Client.metric_depth -> broker -> worker
  gateway-metric   requests + JSON + base64, as the old server's client did -> POST /metric_depth
                   -> gateway (zdepth.AsyncClient) -> broker -> worker; depth decoded from base64
  direct-pc        zdepth.Client.pointcloud (points computed on the client, no colours) -> broker -> worker
  gateway-pc       POST /pc: the gateway computes the points and sends both arrays as base64

The worker is the minimal echo worker of transport.py (a fixed depth map, no
model; ``--worker stub`` uses the real Worker with a stub engine, which
decodes the JPEG), so the numbers are the paths' own cost. One request at a
time, warm-up excluded, the modes interleaved in rounds so that drifting
background load hits them alike. The gateway runs as ``python -m
zdepth.gateway`` in its own process, its access log off.

    python benchmarks/gateway.py [--quick] [--seconds 20] [--json out.json]
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import _common
import _peers

NAME = "gateway"
KEY = "bench-key"
INTRINSICS = {"fx": 500.0, "fy": 500.0, "cx": 319.5, "cy": 239.5}
MODES = ("direct-metric", "gateway-metric", "direct-pc", "gateway-pc")
DESCRIPTIONS = {
    "direct-metric": "zdepth.Client.metric_depth -> broker -> worker",
    "gateway-metric": "requests, JSON + base64 -> POST /metric_depth -> gateway -> broker -> worker",
    "direct-pc": "zdepth.Client.pointcloud (points on the client) -> broker -> worker",
    "gateway-pc": "requests, JSON + base64 -> POST /pc (points on the gateway) -> broker -> worker",
}


def start_gateway(broker: str, log: Path) -> tuple[subprocess.Popen, str]:
    """The gateway as a user starts it, on a free loopback port; returns once /health answers 200."""
    import requests

    port = _common.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDEPTH_")}
    env.update(ZDEPTH_KEY=KEY, PYTHONPATH=_common.checkout_pythonpath())
    argv = [sys.executable, "-m", "zdepth.gateway", "--broker", broker, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the gateway did not become healthy within 60 s:\n{log.read_text()[-3000:]}")


def make_calls(client: Any, session: Any, url: str, jpeg: bytes, shape: tuple[int, int]) -> dict[str, Callable[[], np.ndarray]]:
    """One callable per mode, each returning the depth map (and, for /pc, checking the points), decoded as its client would."""
    image = base64.b64encode(jpeg).decode("ascii")  # the old client's encode_image: once per frame, outside the timing
    headers = {"Authorization": f"Bearer {KEY}"}
    fields = {"image": image, "encoder": "vits", "dataset": "hypersim", "max_depth": 20.0}

    def direct_metric() -> np.ndarray:
        return client.metric_depth(jpeg, max_depth=20.0).depth

    def gateway_metric() -> np.ndarray:
        response = session.post(f"{url}/metric_depth", json=fields, headers=headers)
        response.raise_for_status()
        body = response.json()
        return np.frombuffer(base64.b64decode(body["depth_map"]), dtype=np.float32).reshape(body["shape"])

    def direct_pc() -> np.ndarray:
        result = client.pointcloud(jpeg, INTRINSICS, max_depth=20.0, colors=False)
        assert result.points.shape == (shape[0] * shape[1], 3)
        return result.depth.depth

    def gateway_pc() -> np.ndarray:
        response = session.post(f"{url}/pc", json={**fields, "camera_intrinsics": INTRINSICS}, headers=headers)
        response.raise_for_status()
        body = response.json()
        points = np.frombuffer(base64.b64decode(body["pointcloud"]), dtype=np.float32).reshape(body["pointcloud_shape"])
        assert points.shape == (shape[0] * shape[1], 3)
        return np.frombuffer(base64.b64decode(body["depth_map"]), dtype=np.float32).reshape(body["depth_shape"])

    return {"direct-metric": direct_metric, "gateway-metric": gateway_metric, "direct-pc": direct_pc, "gateway-pc": gateway_pc}


def components(shape: tuple[int, int], iterations: int) -> list[dict[str, Any]]:
    """In process, per frame: what the gateway does to answer, and what the old client does to read the answer."""
    import json

    from zdepth.gateway import _blob, json_parts
    from zdepth.pointcloud import Intrinsics, depth_to_points

    depth = _peers.fixed_depth(*shape)
    intrinsics = Intrinsics(**INTRINSICS)

    def depth_answer() -> list[bytes]:
        return json_parts([("depth_map", _blob(depth)), ("shape", list(shape)), ("min", 0.0), ("max", 1.0)])

    def pc_answer() -> list[bytes]:
        points, _ = depth_to_points(depth, intrinsics)
        return json_parts([("pointcloud", _blob(points)), ("pointcloud_shape", list(points.shape)), ("depth_map", _blob(depth)), ("depth_shape", list(shape)), ("min", 0.0), ("max", 1.0)])

    depth_body, pc_body = b"".join(depth_answer()), b"".join(pc_answer())

    def read_depth() -> None:
        body = json.loads(depth_body)
        np.frombuffer(base64.b64decode(body["depth_map"]), dtype=np.float32).reshape(body["shape"])

    def read_pc() -> None:
        body = json.loads(pc_body)
        np.frombuffer(base64.b64decode(body["pointcloud"]), dtype=np.float32).reshape(body["pointcloud_shape"])
        np.frombuffer(base64.b64decode(body["depth_map"]), dtype=np.float32).reshape(body["depth_shape"])

    steps = [
        ("gateway", "depth map to base64 JSON", depth_answer, len(depth_body)),
        ("gateway", "points from depth, both to base64 JSON", pc_answer, len(pc_body)),
        ("old client", "JSON + base64 decode of a depth answer", read_depth, len(depth_body)),
        ("old client", "JSON + base64 decode of a /pc answer", read_pc, len(pc_body)),
    ]
    rows = []
    for side, step, call, size in steps:
        stats = _common.summarize(_common.time_calls(call, iterations=iterations, warmup=2))
        rows.append({"side": side, "step": step, "answer bytes": size, "p50 ms": stats["p50"], "mean ms": stats["mean"]})
    return rows


def main() -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per mode (all rounds together)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per mode first")
    parser.add_argument("--rounds", type=int, default=5, help="modes are interleaved this many times (background load drifts)")
    parser.add_argument("--worker", choices=("echo", "stub"), default="echo", help="echo: the minimal protocol worker; stub: the real Worker, stub engine")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.rounds = 1.0, 2, 1

    import requests

    from zdepth import Client

    shape = _common.FRAME_SHAPE
    jpeg = _common.jpeg_bytes(_common.frames_bgr(1, shape)[0])
    machine = _common.machine_info(torch_info=False)
    report = _common.Report()
    print(f"gateway: a {len(jpeg)}-byte {shape[0]}x{shape[1]} JPEG in, a {shape[0]}x{shape[1]} float32 depth map out, {args.worker} worker")
    print(_common.machine_line(machine))

    broker = worker = gateway = None
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        broker, clients_address, workers_address = _common.start_broker(KEY)
        models = ("vits-hypersim",)
        if args.worker == "echo":
            worker, _ = _peers.start(_peers.echo_worker, workers_address, KEY, shape, models, name="echo-worker")
        else:
            worker, _ = _peers.start(_peers.stub_worker, workers_address, KEY, shape, 2.0, models, name="stub-worker")
        _common.wait_for_workers(clients_address, KEY, 1, model="vits-hypersim")
        with tempfile.TemporaryDirectory(prefix="zdepth-gateway-bench-") as tmp:
            gateway, url = start_gateway(clients_address, Path(tmp) / "gateway.log")
            with Client(clients_address, key=KEY, timeout=30, encoder="vits", dataset="hypersim") as client, requests.Session() as session:
                calls = make_calls(client, session, url, jpeg, shape)
                reference = calls["direct-metric"]()
                for mode, call in calls.items():  # each path really returns the same depth map
                    depth = call()
                    assert depth.shape == shape and np.array_equal(depth, reference), mode
                    for _ in range(args.warmup):
                        call()
                per_round = args.seconds / args.rounds
                for _ in range(args.rounds):
                    for mode, call in calls.items():
                        stop = time.perf_counter() + per_round
                        while time.perf_counter() < stop:
                            samples[mode] += _common.time_calls(call, iterations=1, warmup=0)
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()
        _common.stop_process(worker)
        _common.stop_process(broker)

    stats = {m: _common.summarize(samples[m]) for m in MODES}
    rows = []
    for mode in MODES:
        direct = stats["direct-" + mode.split("-", 1)[1]]
        s = stats[mode]
        rows.append({
            "mode": mode,
            "what": DESCRIPTIONS[mode],
            "n": s["n"],
            "p50 ms": s["p50"],
            "p99 ms": s["p99"],
            "mean ms": s["mean"],
            "x direct (p50)": _common.ratio(s["p50"], direct["p50"]),
            "x direct (p99)": _common.ratio(s["p99"], direct["p99"]),
            "+ms over direct (p50)": s["p50"] - direct["p50"],
        })  # fmt: skip
    report.table(rows, list(rows[0]), title=f"One {shape[0]}x{shape[1]} frame, one request at a time, client's view ({args.worker} worker)")
    component_rows = components(shape, 3 if args.quick else 30)
    report.table(component_rows, list(component_rows[0]), title="Where the added milliseconds go (in process, per frame)")
    added = {op: stats[f"gateway-{op}"]["p50"] - stats[f"direct-{op}"]["p50"] for op in ("metric", "pc")}
    report.note(
        f"The gateway adds {added['metric']:.1f} ms per depth map and {added['pc']:.1f} ms per point cloud at p50 "
        "(base64 and JSON both ways, HTTP, and one more hop); the model's own time comes on top of every row alike."
    )
    result = {
        "benchmark": NAME,
        "machine": machine,
        "report": report.parts,
        "config": {"shape": list(shape), "jpeg_bytes": len(jpeg), "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds, "worker": args.worker, "quick": args.quick},
        "modes": {m: {"description": DESCRIPTIONS[m], **stats[m]} for m in MODES},
        "added_p50_ms": added,
        "components": component_rows,
    }
    _common.write_json(NAME, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
