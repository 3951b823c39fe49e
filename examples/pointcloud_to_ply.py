"""A coloured point cloud from one photo and the camera's intrinsics, written as a binary PLY.

    python examples/pointcloud_to_ply.py photo.jpg --fx 1982.4 --fy 1978.0 --cx 2061.6 --cy 1546.4 --out cloud.ply
    python examples/pointcloud_to_ply.py photo.jpg --intrinsics K.txt --server lab --model vitl-hypersim

Intrinsics are in pixels of the image you send (rescale them if you resize it).
Open the PLY in MeshLab, CloudCompare or Open3D. Depth comes from a metric
model (hypersim: indoor, up to 20 m; vkitti: outdoor, up to 80 m).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from zdepth import Client, ZdepthError
from zdepth.models import split_model_id
from zdepth.pointcloud import Intrinsics


def connect(server: str, **options) -> Client:
    """An address (tcp://host:5555) or a profile name from ~/.config/zdepth/profiles.toml."""
    if "://" in server:
        return Client(server, **options)
    return Client.from_profile(server, **options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image")
    parser.add_argument("--server", default=os.environ.get("ZDEPTH_SERVER", "tcp://localhost:5555"), help="address or profile name")
    parser.add_argument("--model", default="vits-hypersim", help="a metric model: ENCODER-hypersim or ENCODER-vkitti")
    parser.add_argument("--fx", type=float)
    parser.add_argument("--fy", type=float)
    parser.add_argument("--cx", type=float)
    parser.add_argument("--cy", type=float)
    parser.add_argument("--intrinsics", help="a file with the 3x3 camera matrix (text, .npy or .json)")
    parser.add_argument("--max-depth", type=float, default=None, help="metres; the model's default if not given")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--out", default=None, help="the PLY file (default: IMAGE.ply)")
    args = parser.parse_args()

    if args.intrinsics:
        intrinsics = Intrinsics.from_file(args.intrinsics)
    elif None not in (args.fx, args.fy, args.cx, args.cy):
        intrinsics = Intrinsics(args.fx, args.fy, args.cx, args.cy)
    else:
        parser.error("give --fx --fy --cx --cy, or --intrinsics FILE")
    encoder, dataset = split_model_id(args.model)
    if not dataset:
        parser.error(f"{args.model!r} is a relative model; a point cloud needs a metric one such as {encoder}-hypersim")
    out = args.out or os.path.splitext(args.image)[0] + ".ply"

    try:
        with connect(args.server) as client:
            cloud = client.pointcloud(
                args.image, intrinsics, encoder=encoder, dataset=dataset, max_depth=args.max_depth, input_size=args.input_size
            )
    except (ZdepthError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    cloud.save_ply(out)
    valid = cloud.points[np.isfinite(cloud.points).all(axis=1) & (cloud.points[:, 2] > 0)]
    print(f"{len(cloud.points)} points ({len(valid)} with positive depth), depth {cloud.depth.min:.2f}..{cloud.depth.max:.2f} m")
    if len(valid):
        low, high = valid.min(axis=0), valid.max(axis=0)
        print(f"bounds x {low[0]:.2f}..{high[0]:.2f}, y {low[1]:.2f}..{high[1]:.2f}, z {low[2]:.2f}..{high[2]:.2f} m")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
