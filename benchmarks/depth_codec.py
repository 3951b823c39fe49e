"""Does a lossless codec on float16 depth pay for its CPU time on a 1 GbE lab link?

A 480x640 float16 depth map is 614,400 bytes: 4.9 ms on a 1 Gbit/s link, and
a link carries about 200 of them a second (six cameras at 30 frames/s). A
codec pays when it shrinks the bytes by more time than it spends: the worker
encodes, the client decodes, and the wire carries fewer bytes. Measured here:
zstd (levels 1 and 3) on the float16 bytes as they are, and on byte planes
(all high bytes, then all low bytes: the high bytes of a smooth depth map
repeat, the low ones are noise), on depth maps the real model computes for the
test photos. Reported per codec: size ratio, encode and decode ms (one core),
the time per frame on the link (encode + wire + decode) and the frames/s the
link allows, against sending the float16 bytes as they are.

    python benchmarks/depth_codec.py [--quick] [--link-mbit 1000] [--input-size 266]

The depth maps come from the checkpoint in ``--weights-dir`` (generated if
missing: the test suite's seeded vits weights, whose maps are rougher than a
trained model's, so real maps compress at least as well as measured here).
"""

from __future__ import annotations

from typing import Any, Callable

import _common

NAME = "depth_codec"


def shuffle(half: Any) -> bytes:
    """float16 -> its high bytes, then its low bytes (little-endian: byte 1 of each value is the high one)."""
    planes = half.view("u1").reshape(-1, 2)
    return planes[:, 1].tobytes() + planes[:, 0].tobytes()


def unshuffle(data: bytes, shape: tuple[int, ...]) -> Any:
    import numpy as np

    planes = np.frombuffer(data, np.uint8).reshape(2, -1)
    out = np.empty((planes.shape[1], 2), np.uint8)
    out[:, 1], out[:, 0] = planes[0], planes[1]
    return out.view(np.float16).reshape(shape)


def codecs() -> dict[str, tuple[Callable[[Any], bytes], Callable[[bytes, tuple[int, ...]], Any]]]:
    import numpy as np
    import zstandard

    def zstd(level: int, shuffled: bool):
        compressor, decompressor = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
        if shuffled:
            return (lambda a: compressor.compress(shuffle(a)), lambda d, shape: unshuffle(decompressor.decompress(d), shape))
        return (lambda a: compressor.compress(a.tobytes()), lambda d, shape: np.frombuffer(decompressor.decompress(d), np.float16).reshape(shape))

    return {
        "float16 as is": (lambda a: a.tobytes(), lambda d, shape: np.frombuffer(d, np.float16).reshape(shape)),
        "zstd-1": zstd(1, False),
        "zstd-3": zstd(3, False),
        "planes + zstd-1": zstd(1, True),
        "planes + zstd-3": zstd(3, True),
    }


def depth_maps(weights_dir: str | None, input_size: int) -> tuple[list[Any], str]:
    """float16 depth maps the real model computes for the test photos at 480x640, on the CPU."""
    import numpy as np

    from zdepth.engine import Engine

    weights, source = _common.prepare_weights(weights_dir, ["vits"])
    engine = Engine(device="cpu", weights_dir=weights)
    engine.load("vits")
    frames = _common.frames_bgr(2)
    return [np.ascontiguousarray(d.astype(np.float16)) for d in engine.infer(frames, "vits", input_size=input_size)], source


def main() -> None:
    parser = _common.base_parser(__doc__)
    parser.add_argument("--link-mbit", type=float, default=1000.0, help="the link's rate in Mbit/s (default 1000: 1 GbE)")
    parser.add_argument("--input-size", type=int, default=266, help="network input side for the depth maps")
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.input_size = 2, 70

    import numpy as np

    machine = _common.machine_info()
    print(f"lossless codecs on 480x640 float16 depth, {args.link_mbit:.0f} Mbit/s link")
    print(_common.machine_line(machine))
    maps, weights_source = depth_maps(args.weights_dir, args.input_size)
    link_bytes_per_ms = args.link_mbit * 1e6 / 8 / 1000 * 0.94  # TCP/IP and Ethernet framing take about 6 %
    rows: list[dict[str, Any]] = []
    baseline: dict[str, float] | None = None
    for name, (encode, decode) in codecs().items():
        sizes, enc_ms, dec_ms = [], [], []
        for depth in maps:
            data = encode(depth)
            assert np.array_equal(decode(data, depth.shape), depth), f"{name} is not lossless"
            sizes.append(len(data))
            enc_ms += _common.time_calls(lambda: encode(depth), iterations=args.iterations, warmup=1)
            dec_ms += _common.time_calls(lambda: decode(data, depth.shape), iterations=args.iterations, warmup=1)
        size = sum(sizes) / len(sizes)
        encode_ms, decode_ms = float(np.median(enc_ms)), float(np.median(dec_ms))
        wire_ms = size / link_bytes_per_ms
        row = {
            "codec": name,
            "bytes": size,
            "ratio": maps[0].nbytes / size,
            "encode ms": encode_ms,
            "decode ms": decode_ms,
            "wire ms": wire_ms,
            "frame ms on the link": encode_ms + wire_ms + decode_ms,
            "link frames/s": 1000 / wire_ms,
        }
        if baseline is None:
            baseline = row
        row["latency vs as is"] = _common.ratio(row["frame ms on the link"], baseline["frame ms on the link"])
        row["link frames/s vs as is"] = _common.ratio(row["link frames/s"], baseline["link frames/s"])
        rows.append(row)
    best = min(rows[1:], key=lambda r: r["frame ms on the link"])
    verdict = (
        f"best codec: {best['codec']} ({best['ratio']:.2f}x smaller); a frame on the link {best['frame ms on the link']:.2f} ms "
        f"against {baseline['frame ms on the link']:.2f} ms as is; the link carries {best['link frames/s']:.0f} frames/s against "
        f"{baseline['link frames/s']:.0f}, for {best['encode ms']:.2f} ms of a worker core and {best['decode ms']:.2f} ms of a client core a frame"
    )
    report = _common.Report()
    report.table(rows, list(rows[0]), title=f"480x640 float16 depth over {args.link_mbit:.0f} Mbit/s, one core per side")
    report.note(verdict)
    _common.write_json(NAME, {"benchmark": NAME, "machine": machine, "weights": weights_source, "args": vars(args), "rows": rows, "verdict": verdict, "report": report.parts}, args.json)


if __name__ == "__main__":
    main()
