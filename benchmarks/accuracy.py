"""Accuracy guard: the fast path must stay close to the fp32 reference.

On the test photos (``tests/data``: demo01.jpg 640x426 and demo04.jpg 640x416,
or the .jpg files in ``$ZDEPTH_DATA``; at their own size and resized to
480x640), with the same weights (the test suite's seeded vits weights, random
weights in the official format for the other encoders; official checkpoints
from ``--weights-dir``):

  fast-path   ``Engine`` as served by default, from the JPEG bytes (cv2 decode,
              GPU preprocessing and fp16 on CUDA) vs the reference (cv2 decode
              of the same bytes, ``preprocess_cv2``, fp32 model, one image at a
              time, ``resize_depth``): relative L2 <= 1e-2; on CUDA also with
              CUDA graphs (``fast-path+graphs``, <= 1e-2) and with nvjpeg
              decoding (``fast-path+nvjpeg``, opt-in: its chroma upsampling
              differs from cv2's; <= 3e-2 catches a broken decoder, not that)
  fp16        the fp16 model vs the fp32 model on the same ``preprocess_cv2``
              input, both resized back the same way: relative L2 <= 2e-3
  torch-pre   the fast path's preprocessing (``preprocess_tensor``: torch bicubic)
              vs ``preprocess_cv2``, both through the fp32 model: relative L2 <= 1e-2

relative L2 = ||ours - reference|| / ||reference||. Exits 1 when a check fails.
On the CPU the Engine runs fp32 with cv2 preprocessing (the fast-path check is
then a self-check); the fp16 check still runs (slowly) through CPU half kernels.

    python benchmarks/accuracy.py [--quick] [--json out.json] [--device cuda --encoders vits,vitb,vitl]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import _common

NAME = "accuracy"
TOLERANCES = {"fast-path": 1e-2, "fast-path+graphs": 1e-2, "fast-path+nvjpeg": 3e-2, "fp16": 2e-3, "torch-pre": 1e-2}


def main() -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", default="vits")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--input-size", type=int, default=None, help="default 518 on CUDA, 182 on the CPU")
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--native", action=argparse.BooleanOptionalAction, default=None, help="also check the photos at their own size (default: on CUDA)")
    args = parser.parse_args()

    import cv2
    import numpy as np
    import torch

    from depth_anything_v2 import build_model, load_checkpoint, preprocess_cv2, preprocess_tensor, resize_depth
    from depth_anything_v2.transforms import network_input_size
    from zdepth.engine import Engine
    from zdepth.protocol.images import decode_image, device_decodable_jpeg

    torch.set_num_threads(1)  # on the CPU see _common.CPU_THREADS_NOTE; on CUDA the host does little
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.input_size = args.input_size or (518 if cuda else 182)
    if args.native is None:
        args.native = cuda
    if args.quick and not cuda:
        args.input_size = min(args.input_size, 70)
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]

    report = _common.Report()
    machine = _common.machine_info()
    print(f"accuracy: {','.join(encoders)} at input {args.input_size} on {device}")
    print(_common.machine_line(machine))

    # (label, JPEG bytes): what a camera sends; the reference decodes them with cv2.
    photos: list[tuple[str, bytes]] = []
    for path in _common.photo_paths()[: 1 if args.quick else None]:
        data = path.read_bytes()
        image = decode_image(data)
        if args.native:
            photos.append((f"{path.name} {image.shape[0]}x{image.shape[1]}", data))
        photos.append((f"{path.name} 480x640", _common.jpeg_bytes(cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA))))
    source = "photos"
    if not photos:
        source = "synthetic (no test photos found)"
        photos = [("synthetic 480x640", _common.jpeg_bytes(_common.synthetic_frame(480, 640)))]
        print("warning: no test photos found; checking on a synthetic frame")

    weights_dir, weights_source = _common.prepare_weights(args.weights_dir, encoders)

    def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))

    rows: list[dict[str, Any]] = []
    for encoder in encoders:
        fp32 = build_model(encoder)
        load_checkpoint(fp32, weights_dir / f"depth_anything_v2_{encoder}.pth")
        fp32 = fp32.eval().requires_grad_(False).to(device, torch.float32)
        fp16 = build_model(encoder)
        load_checkpoint(fp16, weights_dir / f"depth_anything_v2_{encoder}.pth")
        fp16 = fp16.eval().requires_grad_(False).to(device, torch.float16)
        engine = Engine(device=device, weights_dir=weights_dir)
        graphed = Engine(device=device, weights_dir=weights_dir, cuda_graphs=True) if cuda else None
        nvjpeg = Engine(device=device, weights_dir=weights_dir, gpu_decode=True) if cuda else None
        for label, data in photos:
            image = decode_image(data)
            size = image.shape[:2]
            with torch.inference_mode():
                x = preprocess_cv2(image, args.input_size).to(device)
                reference = resize_depth(fp32(x), size)[0].float().cpu().numpy()
                half = resize_depth(fp16(x.half()).float(), size)[0].cpu().numpy()
                rgb = torch.from_numpy(image).to(device).permute(2, 0, 1).flip(0)[None]
                xt = preprocess_tensor(rgb, network_input_size(*size, args.input_size))
                torch_pre = resize_depth(fp32(xt), size)[0].cpu().numpy()
            jpeg = device_decodable_jpeg(data)
            fast_input = jpeg if jpeg is not None else image  # a JPEG nvjpeg cannot take is decoded by cv2 anyway
            checks = [("fast-path", engine.infer([fast_input], encoder, input_size=args.input_size)[0], f"Engine {engine.precision}, cv2 decode")]
            if graphed is not None:
                checks.append(("fast-path+graphs", graphed.infer([fast_input], encoder, input_size=args.input_size)[0], f"Engine {graphed.precision}, CUDA graphs"))
            if nvjpeg is not None:
                decoder = "nvjpeg" if jpeg is not None and nvjpeg.decodes_jpeg else "cv2 (fallback)"
                checks.append(("fast-path+nvjpeg", nvjpeg.infer([fast_input], encoder, input_size=args.input_size)[0], f"Engine {nvjpeg.precision}, {decoder} decode"))
            checks += [("fp16", half, "fp16 model"), ("torch-pre", torch_pre, "torch preprocessing")]
            for check, got, path in checks:
                error = rel_l2(got, reference)
                rows.append({"model": encoder, "image": label, "check": check, "compared": path, "rel L2": error, "tolerance": TOLERANCES[check], "ok": error <= TOLERANCES[check]})
            print(f"  {encoder} {label}: " + ", ".join(f"{r['check']} {r['rel L2']:.2e}" for r in rows[-len(checks):]), flush=True)
        fp32 = fp16 = engine = graphed = nvjpeg = None  # free the device memory before the next encoder
        if cuda:
            torch.cuda.empty_cache()

    report.table(rows, list(rows[0]), title=f"Relative L2 against the fp32 reference, input {args.input_size}, {device}; weights: {weights_source}")
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    result = {
        "benchmark": NAME,
        "machine": machine,
        "report": report.parts,
        "config": {**vars(args), "photos": source, "weights": weights_source},
        "tolerances": TOLERANCES,
        "checks": rows,
        "passed": not failed,
    }
    _common.write_json(NAME, result, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
