"""Transport: one 480x640 float32 depth reply, through the broker, against direct ZeroMQ and HTTP.

No model. Every path carries the same request (a 480x640 JPEG, the kind of
frame a camera sends) and the same reply (a fixed 480x640 float32 depth map),
and the round trip is timed from the client's side, one request at a time,
warm-up excluded, the modes interleaved in rounds so that drifting background
load hits them alike:

  http              FastAPI + uvicorn + pydantic in a process, ``requests`` client,
                    JSON with base64 image in and base64 float32 depth out (the old server)
  zmq-direct        DEALER -> ROUTER echo process, raw array frame (the floor)
  zmq-direct-mpn    the same, reply as one msgpack-numpy body instead of a raw frame
  zmq-proxy         the same client -> libzmq's C forwarder (zmq.proxy) in a process -> echo:
                    the price of one more hop with no Python in it
  broker-dealer     the same DEALER client -> real broker process -> minimal echo worker
  broker-dealer-ipc the same, the worker attached to the broker over ipc:// instead of TCP
  broker-client     zdepth.Client -> real broker -> minimal echo worker
  broker-worker     zdepth.Client -> real broker -> real Worker with a stub engine
                    (decodes the JPEG, batching thread; WorkerConfig defaults)
  broker-worker-nowait  the same with max_wait_ms=0 (no wait for batch company)

  broker-dealer-baseline  broker-dealer with the broker of another source tree
                    (``--baseline-source``, say a checkout of the last release): before and after in one run

Targets: broker-client >= 20x faster than http at p50; the broker's hop
(broker-dealer - zmq-direct) at most 1.3x the C proxy's (zmq-proxy -
zmq-direct) at p50; the older goal of at most 0.3 ms over zmq-direct is still
printed. ``--profile`` adds py-spy profiles of the broker and the client during
a broker run and prints where time goes.

    python benchmarks/transport.py [--quick] [--json out.json] [--profile] [--baseline-source DIR]
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

import _common
import _peers

NAME = "transport"
KEY = "bench-key"


# ----------------------------------------------------------------------------- clients


class DealerClient:
    """The thinnest protocol client: one DEALER, one request at a time, reply arrays viewed in place."""

    def __init__(self, ctx, endpoint: str, image: bytes, *, body: str = "raw", key: str | None = None) -> None:
        import zmq

        from zdepth.protocol import codec
        from zdepth.protocol.auth import apply_peer_security

        self._zmq = zmq
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        apply_peer_security(self.sock, key=key, curve=None)  # a keyed broker asks for the key at the handshake
        self.sock.connect(endpoint)
        self.image = image
        self.params = codec.params_frame({"format": "encoded"})
        self.ids = itertools.count()
        self.body = body

    def __call__(self) -> np.ndarray:
        from zdepth import protocol
        from zdepth.protocol import codec

        request_id = format(next(self.ids), "x")
        head = protocol.request_header(id=request_id, key=KEY, op=protocol.OP_RELATIVE, model="vits", timeout_ms=10_000)
        self.sock.send_multipart([head, self.params, self.image], copy=False)
        frames = self.sock.recv_multipart(copy=False)
        header = protocol.unpack_map(frames[0].buffer, what="reply header", limit=None)
        if header.get("status") != "ok" or header.get("id") != request_id:
            raise RuntimeError(f"unexpected reply {header}")
        if self.body == "msgpack-numpy":
            return codec.unpack_body(frames[1].buffer, what="reply body", limit=1 << 30)["depth"]
        return codec.decode_arrays(header["arrays"], [f.buffer for f in frames[1:]])["depth"]

    def close(self) -> None:
        self.sock.close(0)


class HttpClient:
    """The old client's way: base64 the image into JSON, POST, parse JSON, base64-decode the depth."""

    def __init__(self, url: str, image: bytes) -> None:
        import requests

        self.session = requests.Session()
        self.url = url
        self.image = image
        self.headers = {"Authorization": f"Bearer {KEY}"}

    def __call__(self) -> np.ndarray:
        payload = {"image": base64.b64encode(self.image).decode("ascii"), "encoder": "vits", "dataset": "hypersim", "model_input_size": 518}
        response = self.session.post(self.url, json=payload, headers=self.headers, timeout=10)
        response.raise_for_status()
        body = response.json()
        return np.frombuffer(base64.b64decode(body["depth_map"]), dtype=np.float32).reshape(body["shape"])

    def close(self) -> None:
        self.session.close()


class ZdepthClient:
    def __init__(self, address: str, image: bytes) -> None:
        from zdepth.client import Client

        self.client = Client(address, key=KEY, timeout=10.0, retries=0).open()
        self.image = image
        self.worker_ms: list[float] = []  # the worker's receipt-to-reply time, per request

    def __call__(self) -> np.ndarray:
        result = self.client.relative_depth(self.image)
        if "worker_ms" in result.timings:
            self.worker_ms.append(result.timings["worker_ms"])
        return result.depth

    def close(self) -> None:
        self.client.close()


# ----------------------------------------------------------------------------- servers


def start_http_process(shape: tuple[int, int]) -> tuple[subprocess.Popen, int]:
    port = _common.free_port()
    process = subprocess.Popen(
        [sys.executable, str(_common.HERE / "_http_server.py"), "--port", str(port), "--key", KEY, "--height", str(shape[0]), "--width", str(shape[1])],
    )
    return process, port


class Stack:
    """Every server process the modes need, started once and stopped together."""

    def __init__(self, shape: tuple[int, int], modes: list[str], baseline_source: Path | None = None) -> None:
        self.shape = shape
        self.processes: list[Any] = []
        self.endpoints: dict[str, str] = {}
        self.modes = modes
        self.baseline_source = baseline_source

    def __enter__(self) -> "Stack":
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        """Launch everything at once, then wait: spawning a process costs an interpreter start."""
        modes = set(self.modes)
        http = start_http_process(self.shape) if "http" in modes else None
        if http:
            self.processes.append(http[0])
        launched = {}
        for mode, body in (("zmq-direct", "raw"), ("zmq-direct-mpn", "msgpack-numpy")):
            if mode in modes:
                launched[mode] = _peers.launch(_peers.direct_echo, self.shape, body, name=mode)
                self.processes.append(launched[mode][0])
        if "zmq-proxy" in modes:
            proxy, (front, back) = _peers.start(_peers.c_proxy, name="c-proxy")
            self.processes.append(proxy)
            self.endpoints["zmq-proxy"] = front
            launched["zmq-proxy-echo"] = _peers.launch(_peers.dealer_echo, back, self.shape, name="proxy-echo")
            self.processes.append(launched["zmq-proxy-echo"][0])
        ipc = f"ipc://{tempfile.gettempdir()}/zdepth-bench-{os.getpid()}.ipc"
        backends = {
            "broker-echo": (_peers.echo_worker, (), "tcp://127.0.0.1:*", {"broker-dealer", "broker-client"}),
            "broker-echo-ipc": (_peers.echo_worker, (), ipc, {"broker-dealer-ipc"}),
            "broker-worker": (_peers.stub_worker, (2.0,), "tcp://127.0.0.1:*", {"broker-worker"}),
            "broker-worker-nowait": (_peers.stub_worker, (0.0,), "tcp://127.0.0.1:*", {"broker-worker-nowait"}),
        }
        backends = {name: spec for name, spec in backends.items() if spec[3] & modes}
        brokers = {}
        for name, (_, _, workers_endpoint, _) in backends.items():
            brokers[name] = _common.launch_broker(KEY, workers=workers_endpoint)
            self.processes.append(brokers[name][0])
        workers = {}
        for name, (target, extra, _, _) in backends.items():
            broker, clients, worker_endpoint = _common.wait_broker(*brokers[name])
            self.endpoints[name] = clients
            self.endpoints[f"{name}:broker_pid"] = str(broker.pid)
            workers[name] = _peers.launch(target, worker_endpoint, KEY, self.shape, *extra, name=f"{name}-worker")
            self.processes.append(workers[name][0])
        for mode, (process, pipe) in launched.items():
            reported = _peers.wait(process, pipe)
            if mode in ("zmq-direct", "zmq-direct-mpn"):
                self.endpoints[mode] = reported
        for name, (process, pipe) in workers.items():
            _peers.wait(process, pipe)
            self.endpoints[f"{name}:worker_pid"] = str(process.pid)
            _common.wait_for_workers(self.endpoints[name], KEY, 1, timeout=60)
        if http:
            self.endpoints["http"] = _common.wait_http(*http)
        if "broker-dealer-baseline" in modes:
            self._start_baseline()

    def _start_baseline(self) -> None:
        """The broker of ``baseline_source`` (its own tree on PYTHONPATH) with the same echo worker."""
        if self.baseline_source is None:
            raise SystemExit("mode broker-dealer-baseline needs --baseline-source DIR (a checkout of the broker to compare with)")
        logs = Path(tempfile.mkdtemp(prefix="zdepth-transport-baseline-"))
        broker = _peers.start_source_broker(self.baseline_source, logs, key=KEY, interval_s=1.0)
        self.processes.append(broker.popen)
        worker, pipe = _peers.launch(_peers.echo_worker, broker.workers, KEY, self.shape, name="baseline-worker")
        self.processes.append(worker)
        _peers.wait(worker, pipe)
        _common.wait_for_workers(broker.clients, KEY, 1, timeout=60)
        self.endpoints["broker-baseline"] = broker.clients
        self.endpoints["broker-baseline:broker_pid"] = str(broker.pid)

    def __exit__(self, *exc: Any) -> None:
        for process in reversed(self.processes):
            if isinstance(process, subprocess.Popen):
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
            else:
                _common.stop_process(process)


def make_client(mode: str, stack: Stack, ctx, image: bytes) -> Callable[[], np.ndarray]:
    ep = stack.endpoints
    if mode == "http":
        return HttpClient(ep["http"], image)
    if mode == "zmq-direct":
        return DealerClient(ctx, ep["zmq-direct"], image)
    if mode == "zmq-direct-mpn":
        return DealerClient(ctx, ep["zmq-direct-mpn"], image, body="msgpack-numpy")
    if mode == "zmq-proxy":
        return DealerClient(ctx, ep["zmq-proxy"], image)
    if mode == "broker-dealer":
        return DealerClient(ctx, ep["broker-echo"], image, key=KEY)
    if mode == "broker-dealer-baseline":
        return DealerClient(ctx, ep["broker-baseline"], image, key=KEY)
    if mode == "broker-dealer-ipc":
        return DealerClient(ctx, ep["broker-echo-ipc"], image, key=KEY)
    if mode == "broker-client":
        return ZdepthClient(ep["broker-echo"], image)
    return ZdepthClient(ep[mode], image)  # broker-worker, broker-worker-nowait


DESCRIPTIONS = {
    "http": "FastAPI+uvicorn, requests, JSON+base64 (old server)",
    "zmq-direct": "DEALER<->ROUTER echo, raw array frame",
    "zmq-direct-mpn": "DEALER<->ROUTER echo, msgpack-numpy body",
    "zmq-proxy": "DEALER -> C zmq.proxy process -> echo (a hop, no Python)",
    "broker-dealer": "DEALER -> broker -> echo worker",
    "broker-dealer-ipc": "DEALER -> broker -(ipc://)-> echo worker",
    "broker-dealer-baseline": "DEALER -> the baseline tree's broker -> echo worker",
    "broker-client": "zdepth.Client -> broker -> echo worker",
    "broker-worker": "zdepth.Client -> broker -> Worker(stub engine), max_wait 2 ms",
    "broker-worker-nowait": "zdepth.Client -> broker -> Worker(stub engine), max_wait 0",
}
ALL_MODES = list(DESCRIPTIONS)
DEFAULT_MODES = [m for m in ALL_MODES if m != "broker-dealer-baseline"]  # that one needs --baseline-source
HOP_TARGET = 1.3  # the broker's hop over direct ZeroMQ, at most this many times the C proxy's


# ----------------------------------------------------------------------------- where the milliseconds go


def components(image: bytes, shape: tuple[int, int], iterations: int) -> list[dict[str, Any]]:
    """In-process cost of each serialisation step on either path, per request."""
    from zdepth import protocol
    from zdepth.protocol import codec

    depth = _peers.fixed_depth(*shape)
    b64_depth = base64.b64encode(depth.tobytes()).decode("ascii")
    response = {"depth_map": b64_depth, "shape": list(shape), "min": 0.0, "max": 1.0}
    response_text = json.dumps(response)
    b64_image = base64.b64encode(image).decode("ascii")
    request = {"image": b64_image, "encoder": "vits", "dataset": "hypersim", "model_input_size": 518}
    request_text = json.dumps(request)
    head = protocol.request_header(id="0123456789abcdef", key=KEY, op="relative_depth", model="vits", timeout_ms=10_000)
    descs, _ = codec.array_frames({"depth": depth})
    reply = protocol.reply_header("0123456789abcdef", model="vits", worker="w", min=0.0, max=1.0, timings={"queue_ms": 0.1, "infer_ms": 1.0, "worker_ms": 1.2}, arrays=descs)
    packed = codec.pack_body({"depth": depth})
    depth_bytes = depth.tobytes()
    steps: list[tuple[str, str, Callable[[], Any]]] = [
        ("http", "client: base64 + json.dumps the image", lambda: json.dumps({**request, "image": base64.b64encode(image).decode("ascii")})),
        ("http", "server: json.loads + base64-decode the image", lambda: base64.b64decode(json.loads(request_text)["image"])),
        ("http", "server: base64-encode the depth", lambda: base64.b64encode(depth.tobytes()).decode("ascii")),
        ("http", "server: json.dumps the reply", lambda: json.dumps(response)),
        ("http", "client: json.loads the reply", lambda: json.loads(response_text)),
        ("http", "client: base64-decode the depth", lambda: np.frombuffer(base64.b64decode(b64_depth), np.float32)),
        ("zmq", "client: msgpack request header", lambda: protocol.request_header(id="0123456789abcdef", key=KEY, op="relative_depth", model="vits", timeout_ms=10_000)),
        ("zmq", "broker: parse request header", lambda: protocol.parse_request_header(head)),
        ("zmq", "worker: msgpack reply header", lambda: protocol.reply_header("0123456789abcdef", model="vits", worker="w", min=0.0, max=1.0, timings={}, arrays=descs)),
        ("zmq", "client: parse reply header + view array", lambda: codec.decode_arrays(protocol.unpack_map(reply, what="r", limit=None)["arrays"], [depth_bytes])),
        ("zmq", "client: copy depth into a writable array (zdepth.Client)", lambda: np.array(depth, dtype=np.float32)),
        ("zmq", "worker: depth.min() + depth.max() for the header", lambda: (float(depth.min()), float(depth.max()))),
        ("zmq", "msgpack-numpy pack of the depth", lambda: codec.pack_body({"depth": depth})),
        ("zmq", "msgpack-numpy unpack of the depth", lambda: codec.unpack_body(packed, what="b", limit=1 << 30)),
        ("jpeg", "worker: cv2 decode of the 480x640 JPEG", lambda: _decode(image)),
    ]
    rows = []
    for path, step, fn in steps:
        stats = _common.summarize(_common.time_calls(fn, iterations=iterations, warmup=max(3, iterations // 10)))
        rows.append({"path": path, "step": step, "p50_ms": stats["p50"], "mean_ms": stats["mean"]})
    return rows


def _decode(image: bytes):
    from zdepth.protocol.images import decode_image

    return decode_image(image)


def summarize_profile(path: Path, top: int = 12) -> list[dict[str, Any]]:
    """Leaf functions of a py-spy raw (collapsed-stack) file by share of samples."""
    if not path.exists():
        return []
    leaves: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else ""
        leaf = frames[-1]
        leaves[f"{leaf}" + (f"  [{thread}]" if thread else "")] += int(count)
        total += int(count)
    return [{"function": name, "share": n / total} for name, n in leaves.most_common(top)] if total else []


def profile_run(stack: Stack, ctx, image: bytes, seconds: float, out_dir: Path) -> dict[str, Any]:
    """py-spy, ``seconds`` each: the broker while broker-dealer runs flat out, this process
    (zdepth.Client) during broker-client, and the real Worker during broker-worker."""
    results: dict[str, Any] = {}
    plans = [
        ("broker-echo", "broker-dealer", {"broker": "broker-echo:broker_pid"}),
        ("broker-echo", "broker-client", {"client": None}),
        ("broker-worker", "broker-worker", {"worker": "broker-worker:worker_pid"}),
    ]
    for backend, mode, targets in plans:
        if backend not in stack.endpoints:
            continue
        spies = {}
        for name, key in targets.items():
            pid = os.getpid() if key is None else int(stack.endpoints[key])
            spies[name] = _common.py_spy(pid, seconds, out_dir / f"{name}.txt")
        if not any(spies.values()):
            return {"error": "py-spy is not installed (pip install py-spy)"}
        time.sleep(0.5)  # py-spy attaches
        client = make_client(mode, stack, ctx, image)
        end = time.monotonic() + seconds
        count = 0
        while time.monotonic() < end:
            client()
            count += 1
        client.close()
        for name, spy in spies.items():
            if spy is not None:
                spy.wait(30)
                results[name] = {"mode": mode, "requests": count, "leaves": summarize_profile(out_dir / f"{name}.txt")}
    return results


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3000, help="timed requests per ZeroMQ mode (all rounds together)")
    parser.add_argument("--http-iterations", type=int, default=600, help="timed requests for the HTTP mode")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10, help="modes are interleaved this many times (background load drifts)")
    parser.add_argument("--modes", default=None, help="comma-separated subset of: " + ", ".join(ALL_MODES))
    parser.add_argument("--baseline-source", type=Path, default=None, help="a source tree whose broker runs side by side (adds broker-dealer-baseline)")
    parser.add_argument("--shape", default="480x640", help="HxW of the float32 depth reply (a small one shows the fixed cost per hop)")
    parser.add_argument("--profile", action="store_true", help="py-spy the broker and the client (needs py-spy)")
    parser.add_argument("--profile-seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.http_iterations, args.warmup, args.rounds = 40, 20, 5, 1
        args.profile_seconds = 1.0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else list(DEFAULT_MODES)
    if args.baseline_source is not None and "broker-dealer-baseline" not in modes:
        modes.append("broker-dealer-baseline")
    unknown = set(modes) - set(ALL_MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")

    import zmq

    shape = tuple(int(n) for n in args.shape.lower().split("x"))
    image = _common.jpeg_bytes(_common.frames_bgr(1, _common.FRAME_SHAPE)[0])
    report = _common.Report()
    machine = _common.machine_info(torch_info=False)
    print(f"transport: {shape[0]}x{shape[1]} float32 reply ({shape[0] * shape[1] * 4} bytes), {len(image)} byte 480x640 JPEG request")
    print(_common.machine_line(machine))

    ctx = zmq.Context()
    samples: dict[str, list[float]] = {m: [] for m in modes}
    profile: dict[str, Any] = {}
    with Stack(shape, modes, args.baseline_source) as stack:
        clients = {m: make_client(m, stack, ctx, image) for m in modes}
        for mode, call in clients.items():  # warm-up, and a check that each path really returns the depth
            depth = call()
            assert depth.shape == shape and depth.dtype == np.float32, (mode, depth.shape, depth.dtype)
            for _ in range(args.warmup if mode != "http" else max(1, args.warmup // 4)):
                call()
        for call in clients.values():
            if isinstance(call, ZdepthClient):
                call.worker_ms.clear()
        for round_index in range(args.rounds):
            for mode, call in clients.items():
                total = args.http_iterations if mode == "http" else args.iterations
                count = total // args.rounds + (1 if round_index < total % args.rounds else 0)
                samples[mode] += _common.time_calls(call, iterations=count, warmup=0)
        worker_ms = {m: _common.summarize(c.worker_ms) for m, c in clients.items() if isinstance(c, ZdepthClient) and c.worker_ms}
        for call in clients.values():
            call.close()
        if args.profile:
            out_dir = Path(tempfile.mkdtemp(prefix="zdepth-transport-profile-"))
            profile = profile_run(stack, ctx, image, args.profile_seconds, out_dir)
            profile["raw_files"] = str(out_dir)
    ctx.term()

    stats = {m: _common.summarize(samples[m]) for m in modes}
    http_p50 = stats.get("http", {}).get("p50")
    direct_p50 = stats.get("zmq-direct", {}).get("p50")
    rows = []
    for mode in modes:
        s = stats[mode]
        rows.append({
            "mode": mode,
            "what": DESCRIPTIONS[mode],
            "n": s["n"],
            "p50 ms": s["p50"],
            "p99 ms": s["p99"],
            "mean ms": s["mean"],
            "x faster than http (p50)": _common.ratio(http_p50, s["p50"]),
            "+ms over zmq-direct (p50)": None if direct_p50 is None else s["p50"] - direct_p50,
            "in worker p50 ms": worker_ms.get(mode, {}).get("p50"),
        })
    report.table(rows, list(rows[0]), title=f"Round trip of one {shape[0]}x{shape[1]} float32 depth map (request: a {len(image)}-byte JPEG), client's view")

    targets = {}
    if "broker-client" in stats and http_p50:
        speedup = http_p50 / stats["broker-client"]["p50"]
        targets["broker-client >= 20x faster than http (p50)"] = {"value": speedup, "target": 20.0, "met": speedup >= 20.0}
    if "broker-dealer" in stats and direct_p50 is not None:
        added = stats["broker-dealer"]["p50"] - direct_p50
        targets["broker adds <= 0.3 ms p50 over zmq-direct"] = {"value": added, "target": 0.3, "met": added <= 0.3}
        if "zmq-proxy" in stats:
            hop = stats["zmq-proxy"]["p50"] - direct_p50
            targets["(of which: any extra hop, C zmq.proxy - zmq-direct)"] = {"value": hop, "target": None, "met": None}
            targets["(of which: the Python broker, broker-dealer - zmq-proxy)"] = {"value": added - hop, "target": None, "met": None}
            ratio = added / hop if hop > 0 else None
            met = None if ratio is None else ratio <= HOP_TARGET
            targets[f"broker hop <= {HOP_TARGET}x the C proxy hop (p50 over zmq-direct)"] = {"value": ratio, "target": HOP_TARGET, "met": met}
            if "broker-dealer-baseline" in stats and hop > 0:
                baseline = (stats["broker-dealer-baseline"]["p50"] - direct_p50) / hop
                targets["(the baseline tree's broker hop, same measure)"] = {"value": baseline, "target": None, "met": None}
    if targets:
        report.table([{"goal": k, **v} for k, v in targets.items()], ["goal", "value", "target", "met"], title="Targets")

    component_rows = components(image, shape, 20 if args.quick else 300)
    report.table(component_rows, ["path", "step", "p50_ms", "mean_ms"], title="Where the milliseconds go (in-process, per request)")
    if profile:
        for name in ("broker", "client", "worker"):
            if profile.get(name):
                entry = profile[name]
                report.table(entry["leaves"], ["function", "share"], title=f"py-spy: {name} process during {entry['mode']}, leaf functions by share of samples ({entry['requests']} requests)")
        if profile.get("error"):
            print(f"\nprofile: {profile['error']}")

    result = {
        "benchmark": NAME,
        "machine": machine,
        "report": report.parts,
        "config": {
            "shape": list(shape), "jpeg_bytes": len(image), "iterations": args.iterations, "http_iterations": args.http_iterations,
            "warmup": args.warmup, "rounds": args.rounds, "quick": args.quick,
        },
        "modes": {m: {"description": DESCRIPTIONS[m], **stats[m]} for m in modes},
        "worker_ms": worker_ms,
        "targets": targets,
        "components": component_rows,
        "profile": profile,
    }
    _common.write_json(NAME, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
