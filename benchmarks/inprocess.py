"""In process: zdepth's Engine against the straightforward reference, same weights, same frames.

The reference is what the official code does per frame: ``preprocess_cv2``
(float64 numpy, cv2 cubic resize) on the CPU, the fp32 model, one image at a
time, ``resize_depth`` back to the frame's size, a copy to the host. The
engine is ``zdepth.engine.Engine`` as a worker runs it (fp16 and GPU
preprocessing on CUDA; the cv2 path in fp32 on the CPU), given batches of
``--batches`` frames. Both start from decoded 480x640 BGR frames and end with
float32 depth maps on the host. Reported per frame, with the ratio.

``--forward`` adds the model's forward pass alone on a ready input (the
reference fp32 model against the engine's model at its precision), batch 1
and 8: where the engine's time goes beside the model. A breakdown of the
reference's own steps (preprocess, forward, resize back) is printed too.

    python benchmarks/inprocess.py [--quick] [--json out.json]
    python benchmarks/inprocess.py --device cuda --encoders vits,vitb,vitl --forward
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Any, Callable

import _common

NAME = "inprocess"


def timed(fn: Callable[[], Any], sync: Callable[[], None], *, seconds: float, min_iterations: int, warmup: int) -> list[float]:
    """ms per call; runs at least ``min_iterations`` and about ``seconds`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    end = time.monotonic() + seconds
    while len(samples) < min_iterations or time.monotonic() < end:
        start = time.perf_counter_ns()
        fn()
        sync()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


def main() -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", default="vits")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default=None, help="the engine's precision (default: fp16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--compile", action="store_true", help="Engine(compile=True); each batch size compiles once, in the warm-up")
    parser.add_argument("--input-size", type=int, default=None, help="default 518 on CUDA, 182 on the CPU")
    parser.add_argument("--batches", default="1,8", help="engine batch sizes")
    parser.add_argument("--forward", action="store_true", help="also time the forward pass alone")
    parser.add_argument("--jpeg", action="store_true", help="also time both paths from JPEG bytes (the engine decodes on the GPU with nvjpeg, gpu_decode=True; the reference with cv2)")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time an Engine(cuda_graphs=True) (CUDA only)")
    parser.add_argument("--seconds", type=float, default=None, help="about this long per measurement (default 2 on CUDA, 6 on the CPU)")
    parser.add_argument("--min-iterations", type=int, default=None)
    parser.add_argument("--weights-dir", default=None, help="a weights dir (real checkpoints); missing files are generated there (golden vits if reachable, else random weights)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on the CPU: " + _common.CPU_THREADS_NOTE + ")")
    args = parser.parse_args()

    import numpy as np
    import torch

    from depth_anything_v2 import build_model, load_checkpoint, network_input_size, preprocess_cv2, resize_depth
    from zdepth.engine import Engine
    from zdepth.protocol.images import decode_image, device_decodable_jpeg

    if not args.threads and (args.quick or not args.device.startswith("cuda")):
        args.threads = 1  # see CPU_THREADS_NOTE
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.input_size = args.input_size or (518 if cuda else 182)
    args.seconds = args.seconds if args.seconds is not None else (2.0 if cuda else 6.0)
    args.min_iterations = args.min_iterations or (10 if cuda else 3)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    warmup = 3 if cuda else 1
    if args.quick:
        args.seconds, args.min_iterations, warmup = 0.0, 2, 1
        if not cuda:
            args.input_size = min(args.input_size, 70)
            batches = batches[:2]
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    report = _common.Report()
    machine = _common.machine_info()
    frames = _common.frames_bgr(max(batches))
    height, width = frames[0].shape[:2]
    net_h, net_w = network_input_size(height, width, args.input_size)
    print(f"in process: {','.join(encoders)}, {height}x{width} frames -> {net_h}x{net_w} network input on {device}")
    print(_common.machine_line(machine))

    weights_dir, weights_source = _common.prepare_weights(args.weights_dir, encoders)

    e2e_rows: list[dict[str, Any]] = []
    forward_rows: list[dict[str, Any]] = []
    breakdown_rows: list[dict[str, Any]] = []
    measure = dict(seconds=args.seconds, min_iterations=args.min_iterations, warmup=warmup)
    for encoder in encoders:
        reference = build_model(encoder)
        load_checkpoint(reference, weights_dir / f"depth_anything_v2_{encoder}.pth")
        reference = reference.eval().requires_grad_(False).to(device, torch.float32)
        engine = Engine(device=device, precision=args.precision, weights_dir=weights_dir, compile=args.compile, gpu_decode=args.jpeg)
        engine.load(encoder)
        fast_model = None

        @torch.inference_mode()
        def reference_frame(image: np.ndarray) -> np.ndarray:
            x = preprocess_cv2(image, args.input_size).to(device)
            depth = reference(x)
            return resize_depth(depth, image.shape[:2])[0].cpu().numpy()

        def reference_row(path: str, frame_fn: Callable[[], Any]) -> float:
            stats = _common.summarize(timed(frame_fn, sync, **measure))
            e2e_rows.append({"model": encoder, "path": path, "batch": 1, "ms/frame p50": stats["p50"], "ms/frame mean": stats["mean"], "speedup vs reference": 1.0})
            return stats["p50"]

        def engine_rows(path: str, run: Engine, inputs: list, reference_ms: float) -> None:
            """One row per batch size: ``run.infer`` on the first ``batch`` of ``inputs``, per frame."""
            for batch in batches:
                items = inputs[:batch]
                stats = _common.summarize(timed(lambda: run.infer(items, encoder, input_size=args.input_size), sync, **measure))
                per_frame = stats["p50"] / batch
                e2e_rows.append({
                    "model": encoder,
                    "path": path,
                    "batch": batch,
                    "ms/frame p50": per_frame,
                    "ms/frame mean": stats["mean"] / batch,
                    "speedup vs reference": _common.ratio(reference_ms, per_frame),
                })
                print(f"  {encoder} {path}, batch {batch}: {per_frame:.2f} ms/frame (reference {reference_ms:.2f})", flush=True)

        # End to end, per frame: the reference one by one, the engine in batches.
        compiled = " compiled" if args.compile else ""
        ref_ms = reference_row("reference fp32, 1 at a time", lambda: reference_frame(frames[0]))
        engine_rows(f"Engine {engine.precision}{compiled}", engine, frames, ref_ms)
        if args.jpeg:
            jpegs = [_common.jpeg_bytes(frame) for frame in frames]
            ref_jpeg_ms = reference_row("reference fp32 from JPEG (cv2 decode), 1 at a time", lambda: reference_frame(decode_image(jpegs[0])))
            decoder = "nvjpeg" if engine.decodes_jpeg else "cv2"
            engine_rows(f"Engine {engine.precision} from JPEG ({decoder} decode)", engine, [device_decodable_jpeg(data) for data in jpegs], ref_jpeg_ms)
        if args.cuda_graphs and cuda:
            graphed = Engine(device=device, precision=args.precision, weights_dir=weights_dir, compile=args.compile, cuda_graphs=True)
            graphed.load(encoder)
            engine_rows(f"Engine {graphed.precision}{compiled} + CUDA graphs", graphed, frames, ref_ms)
            graphed = None

        # The reference's own steps, to see where its milliseconds go.
        with torch.inference_mode():
            x = preprocess_cv2(frames[0], args.input_size).to(device)
            out = reference(x)
            pre = _common.summarize(timed(lambda: preprocess_cv2(frames[0], args.input_size).to(device), sync, **measure))
            fwd = _common.summarize(timed(lambda: reference(x), sync, **measure))
            post = _common.summarize(timed(lambda: resize_depth(out, (height, width))[0].cpu().numpy(), sync, **measure))
        for step, stats in (("preprocess_cv2 + upload", pre), ("forward fp32 batch 1", fwd), ("resize back + to host", post)):
            breakdown_rows.append({"model": encoder, "reference step": step, "ms p50": stats["p50"], "share of reference": _common.ratio(stats["p50"], ref_ms)})

        if args.forward:
            fast_model = engine.model(encoder)
            for batch in batches:
                with torch.inference_mode():
                    x32 = torch.randn(batch, 3, net_h, net_w, device=device)
                    xf = x32.to(engine.dtype)
                    r = _common.summarize(timed(lambda: reference(x32), sync, **measure))
                    f = _common.summarize(timed(lambda: fast_model(xf), sync, **measure))
                forward_rows.append({
                    "model": encoder,
                    "batch": batch,
                    "reference fp32 ms/image": r["p50"] / batch,
                    "engine model": engine.precision + (" compiled" if args.compile else ""),
                    "engine ms/image": f["p50"] / batch,
                    "speedup": _common.ratio(r["p50"], f["p50"]),
                })
                print(f"  {encoder} forward batch {batch}: fp32 {r['p50'] / batch:.2f}, {engine.precision} {f['p50'] / batch:.2f} ms/image", flush=True)
        partial = {"benchmark": NAME, "partial": True, "machine": machine, "end_to_end": e2e_rows, "reference_breakdown": breakdown_rows, "forward": forward_rows}
        _common.write_json(NAME, partial, args.json, quiet=True)
        reference = engine = fast_model = None  # free the device memory before the next encoder
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    report.table(e2e_rows, list(e2e_rows[0]), title=f"End to end per 480x640 frame (decoded BGR in, or JPEG bytes where it says so; depth on the host out), input {args.input_size}, {device}")
    report.table(breakdown_rows, list(breakdown_rows[0]), title="Where the reference's milliseconds go (batch 1)")
    if forward_rows:
        report.table(forward_rows, list(forward_rows[0]), title=f"Forward pass alone, {net_h}x{net_w}")

    result = {
        "benchmark": NAME,
        "machine": machine,
        "report": report.parts,
        "weights": weights_source,
        "config": {**vars(args), "network_input": [net_h, net_w], "batches": batches},
        "end_to_end": e2e_rows,
        "reference_breakdown": breakdown_rows,
        "forward": forward_rows,
    }
    _common.write_json(NAME, result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
