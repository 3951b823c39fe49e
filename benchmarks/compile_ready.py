"""Time to ready with torch.compile: a cold start (empty kernel cache) against a warm one (the cache
a previous start left on disk), each a fresh process from import to the first depth map.

    python benchmarks/compile_ready.py [--device cuda] [--encoder vits] [--input-size 518]

The cache folder is a fresh temporary one, so the cold start really is cold;
the warm start is the same command again. Also reported: the same start
without compile, the floor both approach.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _common

NAME = "compile_ready"

START = r"""
import json, sys, time
began = time.perf_counter()
import torch
from zdepth.engine import Engine
device, encoder, weights, input_size, compile_ = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
if device == "cpu":
    torch.set_num_threads(1)
import numpy as np
frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
engine = Engine(device=device, weights_dir=weights, compile=compile_)
engine.load(encoder)
loaded = time.perf_counter()
engine.infer([frame], encoder, input_size=input_size)
if device.startswith("cuda"):
    torch.cuda.synchronize()
ready = time.perf_counter()
engine.infer([frame], encoder, input_size=input_size)
print(json.dumps({"load_s": loaded - began, "first_call_s": ready - loaded, "ready_s": ready - began}))
"""


def start(device: str, encoder: str, weights: Path, input_size: int, compile_: bool, cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": _common.checkout_pythonpath()}
    out = subprocess.run(
        [sys.executable, "-c", START, device, encoder, str(weights), str(input_size), "1" if compile_ else "0"],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the start failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = _common.base_parser(__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoder", default="vits")
    parser.add_argument("--input-size", type=int, default=None, help="default: 518 on CUDA, 140 on the CPU")
    parser.add_argument("--weights-dir", default=None)
    args = parser.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.input_size = args.input_size or (518 if args.device.startswith("cuda") else 140)
    if args.quick:
        args.input_size = 28

    machine = _common.machine_info()
    print(f"time to ready with torch.compile: {args.encoder} at {args.input_size} on {args.device}")
    print(_common.machine_line(machine))
    weights, weights_source = _common.prepare_weights(args.weights_dir, [args.encoder])
    cache = Path(tempfile.mkdtemp(prefix="zdepth-compile-cache-"))
    rows = []
    for label, compile_ in (("eager (no compile)", False), ("compile, cold cache", True), ("compile, warm cache", True)):
        result = start(args.device, args.encoder, weights, args.input_size, compile_, cache)
        rows.append({"start": label, "ready s": result["ready_s"], "import + load s": result["load_s"], "first call s": result["first_call_s"]})
        print(f"  {label}: ready in {result['ready_s']:.1f} s", flush=True)
    rows[2]["warm / cold"] = _common.ratio(rows[2]["ready s"], rows[1]["ready s"])
    report = _common.Report()
    report.table(rows, ["start", "ready s", "import + load s", "first call s", "warm / cold"], title=f"Time to ready, {args.encoder} at {args.input_size} on {args.device}")
    _common.write_json(NAME, {"benchmark": NAME, "machine": machine, "weights": weights_source, "args": vars(args), "rows": rows, "report": report.parts}, args.json)


if __name__ == "__main__":
    main()
