"""One image in, one depth map out: the smallest useful zdepth client.

    export ZDEPTH_KEY=...                      # if the server has a key
    python examples/one_shot.py photo.jpg --server tcp://gpu-box:5555
    python examples/one_shot.py photo.jpg --server lab --model vits-hypersim   # a profile, metric depth

Writes a colourised depth image (near is bright) and prints what came back.
"""

from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np

from zdepth import Client, ZdepthError
from zdepth.models import split_model_id


def connect(server: str, **options) -> Client:
    """An address (tcp://host:5555) or a profile name from ~/.config/zdepth/profiles.toml."""
    if "://" in server:
        return Client(server, **options)
    return Client.from_profile(server, **options)


def colorize(depth: np.ndarray, *, metric: bool) -> np.ndarray:
    """Depth as a colour image, near bright: relative depth is large when near, metric depth small."""
    finite = np.nan_to_num(depth.astype(np.float32))
    unit = cv2.normalize(finite, None, 0.0, 1.0, cv2.NORM_MINMAX)
    if metric:
        unit = 1.0 - unit
    return cv2.applyColorMap((unit * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="an image file (JPEG, PNG, ...)")
    parser.add_argument("--server", default=os.environ.get("ZDEPTH_SERVER", "tcp://localhost:5555"), help="address or profile name")
    parser.add_argument("--model", default="vits", help="vits, vitb, vitl (relative) or e.g. vits-hypersim (metric, metres)")
    parser.add_argument("--input-size", type=int, default=None, help="network input side, a multiple of 14 (default 518)")
    parser.add_argument("--out", default=None, help="where to write the colour depth image (default: IMAGE_depth.png)")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    encoder, dataset = split_model_id(args.model)
    metric = bool(dataset)
    out = args.out or os.path.splitext(args.image)[0] + "_depth.png"
    try:
        with connect(args.server, timeout=args.timeout) as client:
            if metric:
                result = client.metric_depth(args.image, encoder=encoder, dataset=dataset, input_size=args.input_size)
            else:
                result = client.relative_depth(args.image, encoder=encoder, input_size=args.input_size)
    except (ZdepthError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print(result)
    unit = "m" if metric else "(relative, larger is nearer)"
    print(f"depth {result.shape[1]}x{result.shape[0]}: min {result.min:.3f}, max {result.max:.3f} {unit}")
    print(f"served by {result.worker} with {result.model} in {result.timings['round_trip_ms']:.1f} ms")
    cv2.imwrite(out, colorize(result.depth, metric=metric))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
