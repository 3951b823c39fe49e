"""Wire format: does JPEG-encoding raw camera frames on the client pay off end to end?

A camera loop holds decoded 480x640 BGR frames. ``zdepth.Client`` can send
them as they are (``wire_format="raw"``, 921,600 bytes) or encode them to
JPEG first (``wire_format="jpeg"``, quality 90: ~10x fewer bytes, an encode
here and a decode in the worker). Both go through the real broker to the real
Worker with a stub engine (no model, ``max_wait_ms=0``), so the difference is
the wire format alone; JPEG bytes that already exist (a file, a camera that
encodes) are the third row. ``depth_dtype="float16"`` halves the reply.

The round trips are measured on loopback, where bandwidth is nearly free. For
a real link the table adds an estimate: loopback round trip + bytes / link
rate, and the link rate above which raw wins (the bytes JPEG saves, divided
by the time its encode + decode cost).

    python benchmarks/wire_format.py [--quick] [--json out.json]
"""

from __future__ import annotations

import sys
from typing import Any

import _common
import _peers

NAME = "wire_format"
KEY = "bench-key"
LINKS_MBIT = {"100 Mbit/s": 100, "1 GbE": 1000, "10 GbE": 10_000}
MODES = {
    "raw": ("array", "raw", "float32"),
    "raw-jpeg": ("array", "jpeg", "float32"),
    "jpeg-bytes": ("jpeg", "raw", "float32"),
    "raw, float16 depth": ("array", "raw", "float16"),
    "raw-jpeg, float16 depth": ("array", "jpeg", "float16"),
}


def main() -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1500, help="timed requests per mode (all rounds together)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.warmup, args.rounds = 20, 3, 1

    import cv2

    from zdepth.client import Client
    from zdepth.protocol.images import decode_image

    report = _common.Report()
    machine = _common.machine_info(torch_info=False)
    bgr = _common.frames_bgr(1)[0]
    jpeg = _common.jpeg_bytes(bgr, 90)
    print(f"wire format: a {bgr.shape[0]}x{bgr.shape[1]} BGR frame, {bgr.nbytes} bytes raw, {len(jpeg)} bytes as JPEG q90")
    print(_common.machine_line(machine))

    codec_iterations = 20 if args.quick else 300
    encode = _common.summarize(_common.time_calls(lambda: cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90]), iterations=codec_iterations, warmup=5))
    decode = _common.summarize(_common.time_calls(lambda: decode_image(jpeg), iterations=codec_iterations, warmup=5))

    broker, clients_ep, workers_ep = _common.start_broker(KEY)
    worker = None
    try:
        worker, _ = _peers.start(_peers.stub_worker, workers_ep, KEY, bgr.shape[:2], 0.0, name="stub-worker")
        _common.wait_for_workers(clients_ep, KEY, 1, timeout=60)
        clients = {}
        for mode, (source, wire, dtype) in MODES.items():
            client = Client(clients_ep, key=KEY, timeout=10.0, retries=0, wire_format=wire, depth_dtype=dtype).open()
            frame = jpeg if source == "jpeg" else bgr
            clients[mode] = (client, frame)
        calls = {mode: (lambda c=c, f=f: c.relative_depth(f)) for mode, (c, f) in clients.items()}
        for mode, call in calls.items():
            result = call()
            assert result.depth.shape == bgr.shape[:2], (mode, result.depth.shape)
            for _ in range(args.warmup):
                call()
        samples: dict[str, list[float]] = {m: [] for m in calls}
        per_round = max(1, args.iterations // args.rounds)
        for _ in range(args.rounds):
            for mode, call in calls.items():
                samples[mode] += _common.time_calls(call, iterations=per_round, warmup=0)
        for client, _ in clients.values():
            client.close()
    finally:
        _common.stop_process(worker)
        _common.stop_process(broker)

    reply_bytes = {"float32": bgr.shape[0] * bgr.shape[1] * 4, "float16": bgr.shape[0] * bgr.shape[1] * 2}
    rows = []
    stats = {m: _common.summarize(samples[m]) for m in MODES}
    for mode, (source, wire, dtype) in MODES.items():
        request = len(jpeg) if (source == "jpeg" or wire == "jpeg") else bgr.nbytes
        total = request + reply_bytes[dtype]
        row: dict[str, Any] = {
            "mode": mode,
            "request bytes": request,
            "reply bytes": reply_bytes[dtype],
            "loopback p50 ms": stats[mode]["p50"],
            "loopback p99 ms": stats[mode]["p99"],
        }
        for link, mbit in LINKS_MBIT.items():
            row[f"~{link} ms"] = stats[mode]["p50"] + total * 8 / (mbit * 1e6) * 1000
        rows.append(row)
    report.table(rows, list(rows[0]), title="Round trip through broker + Worker (stub engine), by what the client sends")

    saved_bytes = bgr.nbytes - len(jpeg)
    codec_ms = encode["p50"] + decode["p50"]
    loopback_gap = stats["raw-jpeg"]["p50"] - stats["raw"]["p50"]
    break_even_mbit = saved_bytes * 8 / (max(loopback_gap, 1e-6) / 1000) / 1e6
    report.table(
        [
            {"quantity": "cv2.imencode q90, 480x640 (client)", "value": encode["p50"], "unit": "ms p50"},
            {"quantity": "decode_image of that JPEG (worker)", "value": decode["p50"], "unit": "ms p50"},
            {"quantity": "bytes JPEG saves per frame", "value": float(saved_bytes), "unit": "bytes"},
            {"quantity": "raw-jpeg minus raw on loopback", "value": loopback_gap, "unit": "ms p50"},
            {"quantity": "link rate above which raw is faster", "value": break_even_mbit, "unit": "Mbit/s"},
        ],
        ["quantity", "value", "unit"],
        title="The trade",
    )
    report.note(
        f"JPEG costs {codec_ms:.2f} ms of codec work per frame (encode + decode) and saves {saved_bytes / 1e6:.2f} MB; "
        f"on loopback raw-jpeg is {loopback_gap:+.2f} ms against raw. Below ~{break_even_mbit:.0f} Mbit/s of real "
        "throughput between camera and server JPEG wins; above it raw does. The ~link columns add bytes / rate to the "
        "loopback time (no TCP effects): an estimate, not a measurement."
    )
    result = {
        "benchmark": NAME,
        "machine": machine,
        "report": report.parts,
        "config": {**vars(args), "raw_bytes": int(bgr.nbytes), "jpeg_bytes": len(jpeg)},
        "modes": {m: {"source": s, "wire_format": w, "depth_dtype": d, **stats[m]} for m, (s, w, d) in MODES.items()},
        "encode_ms": encode,
        "decode_ms": decode,
        "break_even_mbit": break_even_mbit,
    }
    _common.write_json(NAME, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
