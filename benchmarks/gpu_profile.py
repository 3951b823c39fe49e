"""Where a single-stream request's milliseconds go inside the engine, and why serving is slower than a loop.

Serving one stream, the worker's ``infer_ms`` was 2-3x the in-process loop's
time per frame for the same model (eager; much less with CUDA graphs). Three
things differ between the two: requests arrive with idle gaps (the device and
the CPU go quiet between them), the engine runs on the worker's compute
thread (not the main one), and another thread sits in a ZeroMQ poll. This
measures ``Engine.infer`` on one 480x640 JPEG frame under each condition, and
each stage of it alone (JPEG decode, preprocessing, forward pass, resize back
and copy to the host), eager and with CUDA graphs.

    python benchmarks/gpu_profile.py [--encoders vits,vitl] [--quick] [--json out.json]
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

import _common

NAME = "gpu_profile"


def main() -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", default="vits,vitl")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--input-size", type=int, default=None, help="default 518 on CUDA, 70 on the CPU")
    parser.add_argument("--iterations", type=int, default=None, help="calls per measurement (default 60 on CUDA, 5 on the CPU)")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="idle time between calls in the 'with gaps' rows")
    parser.add_argument("--weights-dir", default=None)
    args = parser.parse_args()

    import torch
    import zmq

    from depth_anything_v2 import network_input_size, preprocess_tensor, resize_depth
    from zdepth.engine import Engine
    from zdepth.engine.cudagraphs import GraphedForward
    from zdepth.engine.jpeg import torchvision_jpeg_decoder
    from zdepth.protocol.images import decode_image, device_decodable_jpeg

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(1)
    args.input_size = args.input_size or (518 if cuda else 70)
    iterations = args.iterations or (60 if cuda else 5)
    if args.quick:
        iterations = min(iterations, 3)
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    device = torch.device(args.device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def timed(fn: Callable[[], Any], *, gap_s: float = 0.0) -> dict[str, float]:
        for _ in range(3):
            fn()
        sync()
        samples = []
        for _ in range(iterations):
            if gap_s:
                time.sleep(gap_s)
            start = time.perf_counter()
            fn()
            sync()
            samples.append((time.perf_counter() - start) * 1000)
        return _common.summarize(samples)

    def in_thread(fn: Callable[[], dict[str, float]], *, poller: bool) -> dict[str, float]:
        """Run ``fn`` on a new thread, as the worker's compute thread does; optionally with this
        thread blocked in a ZeroMQ poll meanwhile, as the worker's I/O thread is."""
        out: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: out.update(fn()))
        ctx = zmq.Context() if poller else None
        sock = ctx.socket(zmq.PAIR) if ctx else None
        if sock is not None:
            sock.bind("inproc://gpu-profile-idle")
        thread.start()
        while thread.is_alive():
            if sock is not None:
                sock.poll(250)
            else:
                thread.join(0.25)
        if ctx is not None:
            sock.close(0)
            ctx.term()
        return out

    report = _common.Report()
    machine = _common.machine_info()
    print(f"gpu profile: {','.join(encoders)} at input {args.input_size} on {device}, {iterations} calls per row")
    print(_common.machine_line(machine))
    frame = _common.frames_bgr(1)[0]
    jpeg_data = _common.jpeg_bytes(frame)
    jpeg = device_decodable_jpeg(jpeg_data)
    size = network_input_size(*frame.shape[:2], args.input_size)
    weights_dir, weights_source = _common.prepare_weights(args.weights_dir, encoders)
    gap_s = args.gap_ms / 1000

    rows: list[dict[str, Any]] = []
    stage_rows: list[dict[str, Any]] = []
    for encoder in encoders:
        engines = {"eager": Engine(device=device, weights_dir=weights_dir, gpu_decode=True)}
        if cuda:
            engines["CUDA graphs"] = Engine(device=device, weights_dir=weights_dir, cuda_graphs=True, gpu_decode=True)
        for mode, engine in engines.items():
            engine.load(encoder)
            image = jpeg if engine.decodes_jpeg else frame

            def call(engine=engine, image=image) -> None:
                engine.infer([image], encoder, input_size=args.input_size)

            conditions = {
                "back to back, main thread": lambda: timed(call),
                f"{args.gap_ms:g} ms gaps, main thread": lambda: timed(call, gap_s=gap_s),
                f"{args.gap_ms:g} ms gaps, second thread": lambda: in_thread(lambda: timed(call, gap_s=gap_s), poller=False),
                f"{args.gap_ms:g} ms gaps, second thread, zmq poll beside": lambda: in_thread(lambda: timed(call, gap_s=gap_s), poller=True),
            }
            base = None
            for condition, measure in conditions.items():
                stats = measure()
                base = base or stats["p50"]
                rows.append({"model": encoder, "forward": mode, "condition": condition, "p50 ms": stats["p50"], "p90 ms": stats["p90"], "vs back to back": _common.ratio(stats["p50"], base)})
                print(f"  {encoder} {mode:11s} {condition:45s} p50 {stats['p50']:.2f} ms", flush=True)

        # Each stage alone, back to back (main thread), batch 1, eager and graphed forward.
        engine = engines["eager"]
        model = engine.model(encoder)
        with torch.inference_mode():
            data = torch.frombuffer(bytearray(jpeg_data), dtype=torch.uint8)
            rgb = torch.from_numpy(frame[:, :, ::-1].copy()).permute(2, 0, 1)[None].to(device)
            x = preprocess_tensor(rgb, size).to(engine.dtype)
            out = model(x)
            stages = {
                "cv2 decode (CPU)": lambda: decode_image(jpeg_data),
                "upload BGR frame": lambda: (torch.from_numpy(frame).pin_memory() if cuda else torch.from_numpy(frame)).to(device, non_blocking=cuda),
                "preprocess on the device": lambda: preprocess_tensor(rgb, size),
                "forward, eager": lambda: model(x),
                "resize back + copy to host": lambda: resize_depth(out.float(), frame.shape[:2]).cpu(),
            }
            if engine.decodes_jpeg:
                decode = torchvision_jpeg_decoder()  # what the engine decodes with
                stages = {"nvjpeg decode (batch 1)": lambda: decode([data], device), **stages}
                stages["nvjpeg decode (batch 8), per image"] = lambda: decode([data] * 8, device)
            if cuda:
                graphed = GraphedForward(engines["CUDA graphs"].model(encoder))
                stages["forward, CUDA graph replay"] = lambda: graphed(x, None)
            for stage, fn in stages.items():
                stats = timed(fn)
                per = 8 if "batch 8" in stage else 1
                stage_rows.append({"model": encoder, "stage (batch 1)": stage, "p50 ms": stats["p50"] / per})
                print(f"  {encoder} {stage:40s} {stats['p50'] / per:.3f} ms", flush=True)
        engines = engine = model = None
        if cuda:
            torch.cuda.empty_cache()

    report.table(rows, list(rows[0]), title=f"Engine.infer on one 480x640 JPEG frame, input {args.input_size}, {device}")
    report.table(stage_rows, list(stage_rows[0]), title="Each stage alone, back to back")
    result = {
        "benchmark": NAME,
        "machine": machine,
        "report": report.parts,
        "weights": weights_source,
        "config": dict(vars(args)),
        "rows": rows,
        "stages": stage_rows,
    }
    _common.write_json(NAME, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
