"""Fuzz: random and mutated messages at the broker's client port and its worker port.

A real broker and a real CPU worker (``python -m zdepth`` subprocesses) take
``--frames`` messages (100,000 by default), three in four at the client port
and one in four at the worker port:

- client port: random bytes and random frame counts; headers with wrong
  versions, keys, ids, ops, models and timeouts of every type; truncated and
  bit-flipped headers, headers over 4 KiB, non-map msgpack, non-string keys,
  deep nesting; wrong body frame counts; and a small share that passes the
  broker and reaches the worker: mutated params (wrong types, huge declared
  shapes, forbidden dtypes, msgpack-numpy object arrays), mutated images
  (truncated, bit-flipped, decompression-bomb headers), mutated complete
  requests, and valid requests whose ``depth_codec`` is "zstd" or a bad
  value (an unknown name, a wrong type). Most are refused at the broker's
  header stage, which is cheap.
- worker port: sockets pretending to be workers: garbage, wrong versions,
  unknown commands, READY with a wrong key or malformed fields, heartbeats,
  REPLYs with random rids and DISCONNECTs from unknown identities, and from
  one fake worker that did register (with the key) for a model nobody asks for.
- both ports: a few frames just over ``MAXMSGSIZE``, each on a fresh socket:
  the broker must drop that connection (seen with a socket monitor).

Replies are read as they come (several sockets per port), and every message
at the client port must get exactly one reply; of the ``depth_codec``
requests, "zstd" must come back ok with its depth compressed (and decoding),
a bad value as ``bad_request`` naming ``depth_codec``. At the end: a valid
request of each op still gives the result it gave before the fuzzing (within
float tolerance), both processes are alive (the worker is the same process,
registered), and their RSS (VmRSS) at the end is within ``--rss-bound-mb`` of
their RSS after a warm-up. Exits 1 if any check fails.

    python benchmarks/fuzz.py [--frames 100000] [--seed N] [--json out.json]
"""

from __future__ import annotations

import collections
import math
import random
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import _common
from soak import broker_child, child_env, free_port, small_frame, wait_health, worker_child
from zdepth.protocol.auth import apply_peer_security

NAME = "fuzz"
KEY = "fuzz-key"
FAKE_MODEL = "zz-fuzz"  # the registered fake worker's model: sorts after every real one, so never a default
CLIENT_SOCKETS = 8
WORKER_SOCKETS = 8
MAX_OUTSTANDING = 256  # per client socket: sent and not yet answered, before the sender waits
MAX_DEEP_OUTSTANDING = 48  # requests that may reach the worker, not yet answered: keeps the broker's queue short
DEEP_SIZE = 14  # network input of fuzz requests that pass every check: the cheapest inference
TINY = (16, 24)  # height, width of the fuzzer's images
# depth_codec values the worker must refuse: unknown names (near misses included) and wrong types
BAD_CODECS = ("gzip", "ZSTD", "zstd ", "", "lz4", "none\x00", None, 1, True, 1.5, ["zstd"], {"zstd": 1}, b"zstd")


def _pack(obj: Any) -> bytes:
    import msgpack

    return msgpack.packb(obj, use_bin_type=True)


# ----------------------------------------------------------------------------- the generator


class Fuzzer:
    """Random and mutated messages; each method returns (kind, frames)."""

    def __init__(self, rng: random.Random) -> None:
        import cv2
        import numpy as np

        from zdepth.protocol import VERSION
        from zdepth.protocol.codec import image_descriptor, params_frame

        self.rng = rng
        self.version = VERSION
        tiny = small_frame(*TINY)
        self.raw = np.ascontiguousarray(tiny)
        self.raw_desc, _ = image_descriptor(self.raw)
        self.raw_bytes = self.raw.tobytes()
        self.png = cv2.imencode(".png", tiny)[1].tobytes()
        self.jpeg = cv2.imencode(".jpg", tiny)[1].tobytes()
        self.params_raw = params_frame(self.raw_desc, input_size=DEEP_SIZE)
        self.params_encoded = params_frame({"format": "encoded"}, input_size=DEEP_SIZE)
        self.grey = np.ascontiguousarray(tiny[:, :, 0])
        self.bgra = np.ascontiguousarray(np.dstack([tiny, tiny[:, :, :1]]))
        self.u16 = (tiny.astype(np.uint16) * 257).copy()
        self.params_frame = params_frame
        self.image_descriptor = image_descriptor
        self.client_kinds = self._weighted(
            {
                self.random_bytes: 10,
                self.random_frames: 6,
                self.not_a_map: 4,
                self.wrong_version: 6,
                self.wrong_key: 8,
                self.bad_id: 6,
                self.bad_op: 6,
                self.bad_model: 5,
                self.bad_timeout: 4,
                self.oversize_header: 2,
                self.truncated_header: 6,
                self.bitflip_header: 8,
                self.deep_nesting: 1,
                self.non_str_keys: 2,
                self.body_count: 4,
                self.health: 2,
                # past the broker, to the worker: a small share (the worker parses, decodes, infers)
                self.params_garbage: 2.0,
                self.params_mutated: 2.0,
                self.image_mutated: 0.6,
                self.request_mutated: 1.0,
                self.depth_codec: 1.0,
                self.valid_variant: 0.1,
            }
        )
        self.worker_kinds = self._weighted(
            {
                self.w_random: 4,
                self.w_random_frames: 2,
                self.w_wrong_version: 3,
                self.w_unknown_cmd: 3,
                self.w_ready_bad_key: 3,
                self.w_ready_malformed: 3,
                self.w_heartbeat: 2,
                self.w_reply: 3,
                self.w_disconnect: 1,
                self.w_mutated: 4,
            }
        )

    def _weighted(self, table: dict[Callable, float]) -> tuple[list[Callable], list[float]]:
        kinds = list(table)
        total, cumulative = 0.0, []
        for kind in kinds:
            total += table[kind]
            cumulative.append(total)
        return kinds, cumulative

    def client_message(self, *, deep: bool = True) -> tuple[str, list[bytes]]:
        """A client-port message; ``deep=False``: only kinds the broker refuses itself."""
        kinds, cumulative = self.client_kinds
        while True:
            kind = self.rng.choices(kinds, cum_weights=cumulative)[0]
            if deep or kind.__name__ not in DEEP_KINDS:
                return kind.__name__, kind()

    def worker_message(self) -> tuple[str, list[bytes]]:
        kinds, cumulative = self.worker_kinds
        kind = self.rng.choices(kinds, cum_weights=cumulative)[0]
        return kind.__name__, kind()

    # ------------------------------------------------------------------ values

    def new_id(self) -> str:
        return uuid.UUID(int=self.rng.getrandbits(128)).hex[:16]

    def junk(self) -> Any:
        """A random msgpack-able value of a random type."""
        r = self.rng
        return r.choice(
            [
                None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, math.nan, math.inf, -math.inf, "", "x" * r.randint(1, 80),
                r.randbytes(r.randint(0, 16)), [], [1, "a"], {}, {"a": 1}, {"nd": True, "type": "|O", "kind": "O", "shape": [1], "data": b"x"},
            ]
        )  # fmt: skip

    def header(self, **override: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"v": self.version, "id": self.new_id(), "key": KEY, "op": "relative_depth", "model": "vits", "timeout_ms": 20_000}
        for name, value in override.items():
            if value is _MISSING:
                header.pop(name, None)
            else:
                header[name] = value
        return header

    def valid_request(self) -> list[bytes]:
        r = self.rng
        if r.random() < 0.5:
            return [_pack(self.header()), self.params_raw, self.raw_bytes]
        return [_pack(self.header()), self.params_encoded, r.choice([self.png, self.jpeg])]

    def flip(self, data: bytes, flips: int | None = None) -> bytes:
        if not data:
            return data
        buf = bytearray(data)
        for _ in range(flips or self.rng.randint(1, 3)):
            i = self.rng.randrange(len(buf))
            buf[i] ^= 1 << self.rng.randrange(8)
        return bytes(buf)

    # ------------------------------------------------------------------ client port: the broker's header stage

    def random_bytes(self) -> list[bytes]:
        return [self.rng.randbytes(self.rng.randint(0, 64))]

    def random_frames(self) -> list[bytes]:
        return [self.rng.randbytes(self.rng.randint(0, 32)) for _ in range(self.rng.randint(1, 6))]

    def not_a_map(self) -> list[bytes]:
        return [_pack(self.rng.choice([None, 1, "health", b"\x00", [1, 2], [self.header()], 1.5]))]

    def wrong_version(self) -> list[bytes]:
        v = self.rng.choice([0, 2, -1, 255, "1", None, True, [1], _MISSING])
        return [_pack(self.header(v=v, op="health"))] if self.rng.random() < 0.5 else [_pack(self.header(v=v)), self.params_raw, self.raw_bytes]

    def wrong_key(self) -> list[bytes]:
        key = self.rng.choice(["", "fuzz-kex", KEY + "x", KEY[:-1], None, 0, [KEY], {"k": KEY}, KEY.encode(), _MISSING, "x" * 5000])
        if isinstance(key, str) and len(key) > 4000:
            key = "y" * 3000  # stays under the header limit
        return [_pack(self.header(key=key, op=self.rng.choice(["health", "relative_depth"])))]

    def bad_id(self) -> list[bytes]:
        request_id = self.rng.choice([0, 12, "", "i" * 65, ["a"], None, b"abc", {"id": 1}, _MISSING, 1.5])
        return [_pack(self.header(id=request_id, op="health"))]

    def bad_op(self) -> list[bytes]:
        op = self.rng.choice(["", "HEALTH", "relative", "depth", "ready", "reply", 0, None, ["health"], {"op": "health"}, b"health", _MISSING, self.rng.randbytes(4).hex()])
        return [_pack(self.header(op=op))]

    def bad_model(self) -> list[bytes]:
        op, model = self.rng.choice(
            [
                ("relative_depth", 0), ("relative_depth", ""), ("relative_depth", "m" * 65), ("relative_depth", ["vits"]),
                ("relative_depth", "vitl"), ("relative_depth", "vits-hypersim"), ("metric_depth", "vits"), ("metric_depth", "vitg-nowhere"),
                ("pointcloud", "vits"), ("relative_depth", b"vits"), ("relative_depth", None),
            ]
        )  # fmt: skip
        # The body is garbage: the cases that get past the model check fail at the worker's parser.
        return [_pack(self.header(op=op, model=model)), self.rng.randbytes(8), b"x"]

    def bad_timeout(self) -> list[bytes]:
        timeout = self.rng.choice([0, -1, -0.0, math.nan, math.inf, -math.inf, 3_600_001, 2**64 - 1, True, "10", [], 1e308])
        return [_pack(self.header(timeout_ms=timeout)), self.params_raw, self.raw_bytes]

    def oversize_header(self) -> list[bytes]:
        return [_pack(self.header(op="health", pad="p" * self.rng.randint(4097, 9000)))]

    def truncated_header(self) -> list[bytes]:
        frames = self.valid_request() if self.rng.random() < 0.5 else [_pack(self.header(op="health"))]
        frames[0] = frames[0][: self.rng.randrange(len(frames[0]))]
        return frames

    def bitflip_header(self) -> list[bytes]:
        frames = self.valid_request() if self.rng.random() < 0.3 else [_pack(self.header(op="health"))]
        frames[0] = self.flip(frames[0])
        if len(frames) > 1 and self.rng.random() < 0.5:
            frames[1] = b"\xc1"  # never valid msgpack: a header flip that still parses fails at the worker, cheaply
        return frames

    def deep_nesting(self) -> list[bytes]:
        depth = self.rng.randint(100, 3000)
        if self.rng.random() < 0.5:
            return [b"\x91" * depth + b"\xc0"]  # [[[...[nil]...]]]
        return [b"\x81\xa1a" * depth + b"\xc0"]  # {"a": {"a": ...}}

    def non_str_keys(self) -> list[bytes]:
        header = self.header(op="health")
        header[self.rng.choice([1, -5, 2.5, None, True])] = "x"
        try:
            return [_pack(header)]
        except TypeError:
            return [_pack({1: 2})]

    def body_count(self) -> list[bytes]:
        count = self.rng.choice([0, 1, 3, 4, 7])
        return [_pack(self.header()), *[self.raw_bytes[:8]] * count]

    def health(self) -> list[bytes]:
        extra = {"unknown_field": self.junk()} if self.rng.random() < 0.3 else {}
        return [_pack(self.header(op="health", model=_MISSING, timeout_ms=_MISSING, **extra))]

    # ------------------------------------------------------------------ client port: through the broker to the worker

    def params_garbage(self) -> list[bytes]:
        params = self.rng.choice([self.rng.randbytes(self.rng.randint(0, 40)), _pack([1, 2]), _pack(None), b"\xc1", _pack({1: 2}), b"\x00" * 70_000])
        return [_pack(self.header()), params, self.raw_bytes]

    def params_mutated(self) -> list[bytes]:
        r = self.rng
        op = r.choice(["relative_depth", "metric_depth", "pointcloud"])
        model = "vits" if op == "relative_depth" else "vits-hypersim"
        params: dict[str, Any] = {"image": dict(self.raw_desc), "input_size": DEEP_SIZE}
        if op == "pointcloud":
            params["intrinsics"] = [20.0, 20.0, 12.0, 8.0]
        field = r.choice(["image", "format", "dtype", "shape", "input_size", "max_depth", "intrinsics", "depth_dtype", "extra", "nd"])
        image_frame = self.raw_bytes
        if field == "image":
            params["image"] = r.choice([None, "raw", 1, [], {"format": 1}, {}])
        elif field == "format":
            params["image"]["format"] = r.choice(["png", "", None, 7, ["raw"], {"f": 1}, "RAW"])
        elif field == "dtype":
            params["image"]["dtype"] = r.choice(["|O", "<V4", "|V8", "<U4", "|S3", ">u2", "<c8", "float32", "", None, 3, ["|u1"], "O", "<M8[s]"])
        elif field == "shape":
            params["image"]["shape"] = r.choice(
                [[2**31 - 1, 2**31 - 1, 3], [2**40, 2, 3], [-1, 24, 3], [16, 24], [16, 24, 3, 1, 1], [], [16.0, 24, 3], None, "16x24", [True, 24, 3], [16, 24, 2], [0, 0, 3], [2**63 - 1]]
            )  # fmt: skip
        elif field == "input_size":
            params["input_size"] = r.choice([0, -14, 15, 2072, 10**9, "14", True, 14.0, None, [14]])
        elif field == "max_depth":
            params["max_depth"] = r.choice([0, -1, math.nan, math.inf, "20", True, [1]])
        elif field == "intrinsics":
            params["intrinsics"] = r.choice([[0, 0, 0, 0], [1, 2, 3], "fx", [math.nan, 1, 1, 1], [1, -1, 0, 0], [True, 1, 1, 1], None, {"fx": 1}])
        elif field == "depth_dtype":
            params["depth_dtype"] = r.choice(["float64", "", None, 16, ["float16"], {"a": 1}, b"float16"])
        elif field == "extra":
            params[r.choice(["unknown", "", "x" * 300])] = self.junk()
        else:  # a msgpack-numpy array where a field should be, with a forbidden or lying description
            nd = {"nd": True, "type": r.choice(["|O", "<V4", "<f4", "|u1"]), "kind": r.choice(["", "O", "V"]), "shape": r.choice([[2], [2**31 - 1], [-1]]), "data": r.randbytes(r.randint(0, 12))}
            params[r.choice(["intrinsics", "image", "max_depth", "extra"])] = nd
        try:
            body = _pack(params)
        except (TypeError, ValueError, OverflowError):
            body = _pack({"image": None})
        return [_pack(self.header(op=op, model=model)), body, image_frame]

    def image_mutated(self) -> list[bytes]:
        r = self.rng
        choice = r.randrange(10)
        if choice == 0:  # raw, wrong length
            return [_pack(self.header()), self.params_raw, self.raw_bytes[: r.randrange(len(self.raw_bytes))]]
        if choice == 1:  # encoded, random bytes
            return [_pack(self.header()), self.params_encoded, r.randbytes(r.randint(1, 200))]
        if choice == 2:  # encoded, truncated
            data = r.choice([self.png, self.jpeg])
            return [_pack(self.header()), self.params_encoded, data[: r.randrange(1, len(data))]]
        if choice == 3:  # encoded, a few bits flipped (most still decode: then it is inferred)
            return [_pack(self.header()), self.params_encoded, self.flip(r.choice([self.png, self.jpeg]), r.randint(1, 8))]
        if choice == 4:  # a PNG header declaring a huge image
            return [_pack(self.header()), self.params_encoded, png_bomb(r.choice([100_000, 8_000, 2**31 - 1]), r.choice([100_000, 7_000, 1]))]
        if choice == 5:  # a JPEG declaring a huge image behind a stray byte
            return [_pack(self.header()), self.params_encoded, jpeg_bomb(self.jpeg, r.choice([20_000, 30_000, 65_535]))]
        if choice == 6:  # an empty image frame
            return [_pack(self.header()), r.choice([self.params_encoded, self.params_raw]), b""]
        if choice == 7:  # raw dtype and shape that do not match the bytes
            desc = {"format": "raw", "dtype": r.choice(["<u2", "|u1", "<f4"]), "shape": [16, 24, r.choice([1, 3, 4])]}
            return [_pack(self.header()), self.params_frame(desc, input_size=DEEP_SIZE), self.raw_bytes]
        if choice == 8:  # valid pixels, absurd aspect ratio: the network input would be enormous
            side = r.choice([400, 600, 5000])
            desc = {"format": "raw", "dtype": "|u1", "shape": [2, side, 3]}
            return [_pack(self.header()), self.params_frame(desc, input_size=r.choice([518, 2058])), bytes(2 * side * 3)]
        # a GIF, a TIFF: formats the worker does not take
        return [_pack(self.header()), self.params_encoded, r.choice([b"GIF89a" + bytes(40), b"II*\x00" + bytes(40), b"BM" + bytes(10)])]

    def request_mutated(self) -> list[bytes]:
        """A complete valid request, then one structural mutation."""
        r = self.rng
        frames = self.valid_request()
        choice = r.randrange(6)
        if choice == 0:
            frames.pop(r.randrange(1, 3))
        elif choice == 1:
            frames.insert(r.randrange(1, 4), frames[r.randrange(3)])
        elif choice == 2:
            frames[1], frames[2] = frames[2], frames[1]
        elif choice == 3:
            frames[1] = self.flip(frames[1], r.randint(1, 4))
        elif choice == 4:
            frames[1] = frames[1][: r.randrange(len(frames[1]))]
        else:
            frames[0] = _pack(self.header(op=r.choice(["metric_depth", "pointcloud"]), model="vits-hypersim"))  # no intrinsics for pointcloud
        return frames

    def valid_variant(self) -> list[bytes]:
        """Valid but unusual requests: grey, BGRA and 16-bit raw images, metric depth, point clouds, float16."""
        r = self.rng
        image = r.choice([self.grey, self.bgra, self.u16, self.raw])
        desc, array = self.image_descriptor(image)
        op = r.choice(["relative_depth", "metric_depth", "pointcloud"])
        model = "vits" if op == "relative_depth" else "vits-hypersim"
        intrinsics = [20.0, 21.0, 12.0, 8.0] if op == "pointcloud" else None
        params = self.params_frame(
            desc, input_size=DEEP_SIZE, intrinsics=intrinsics, depth_dtype=r.choice(["float32", "float16"]), depth_codec=r.choice(["none", "zstd"])
        )
        return [_pack(self.header(op=op, model=model)), params, array.tobytes()]

    def depth_codec(self) -> list[bytes]:
        """A valid request of any op but for ``depth_codec``: "zstd" (two in five) or a bad value.

        Each reply is checked against what its value asks for (``Run.codec_expected``, ``_codec_outcome``).
        """
        r = self.rng
        op = r.choice(["relative_depth", "metric_depth", "pointcloud"])
        model = "vits" if op == "relative_depth" else "vits-hypersim"
        params: dict[str, Any] = {"image": dict(self.raw_desc), "input_size": DEEP_SIZE, "depth_dtype": r.choice(["float32", "float16"])}
        if op == "pointcloud":
            params["intrinsics"] = [20.0, 20.0, 12.0, 8.0]
        params["depth_codec"] = "zstd" if r.random() < 0.4 else r.choice(BAD_CODECS)
        return [_pack(self.header(op=op, model=model)), _pack(params), self.raw_bytes]

    # ------------------------------------------------------------------ worker port

    def command(self, cmd: Any, **fields: Any) -> dict[str, Any]:
        return {"v": self.version, "cmd": cmd, **fields}

    def w_random(self) -> list[bytes]:
        return [self.rng.randbytes(self.rng.randint(0, 64))]

    def w_random_frames(self) -> list[bytes]:
        return [self.rng.randbytes(self.rng.randint(0, 32)) for _ in range(self.rng.randint(2, 6))]

    def w_wrong_version(self) -> list[bytes]:
        return [_pack({**self.command("heartbeat"), "v": self.rng.choice([0, 2, None, "1", [1]])})]

    def w_unknown_cmd(self) -> list[bytes]:
        cmd = self.rng.choice(["request", "READY", "", "reply ", self.rng.randbytes(3).hex(), 1, None, ["ready"], {"cmd": 1}, b"ready"])
        return [_pack(self.command(cmd))]

    def w_ready_bad_key(self) -> list[bytes]:
        key = self.rng.choice(["", "nope", KEY + " ", None, 1, [KEY], KEY.encode(), _MISSING])
        ready = self.command("ready", key=key, models=["vits"], capacity=4, info={"name": "fuzz"})
        if key is _MISSING:
            ready.pop("key")
        return [_pack(ready)]

    def w_ready_malformed(self) -> list[bytes]:
        r = self.rng
        ready = self.command("ready", key=KEY, models=["vits"], capacity=4, info={"name": "fuzz"})
        field = r.choice(["models", "capacity", "info"])
        ready[field] = {
            "models": r.choice([[], "vits", None, [1], [""], [None], {"vits": 1}, [["vits"]]]),
            "capacity": r.choice([0, -1, True, "4", 1.5, None, [4], -(2**63)]),
            "info": r.choice(["x", 1, [1], True]),
        }[field]
        return [_pack(ready)]

    def w_heartbeat(self) -> list[bytes]:
        return [_pack(self.command("heartbeat", **({"extra": self.junk()} if self.rng.random() < 0.3 else {})))]

    def w_reply(self) -> list[bytes]:
        r = self.rng
        rid = r.choice([r.randint(1, 10**6), r.randint(-(2**63), -1), 2**64 - 1, "1", None, 1.0, [1], True])
        status = r.choice(["ok", "internal", "bad_request", "nope", None, 3])
        body = [_pack({"v": self.version, "id": self.new_id(), "status": "ok"}), r.randbytes(r.randint(0, 64))][: r.randint(0, 2)]
        return [_pack(self.command("reply", rid=rid, status=status)), *body]

    def w_disconnect(self) -> list[bytes]:
        return [_pack(self.command("disconnect", reason=self.rng.choice(["draining", "", None, 5])))]

    def w_mutated(self) -> list[bytes]:
        # (not READY: a flip could, very rarely, make a valid one with the key, and a real worker that never answers)
        frames = self.rng.choice([self.w_heartbeat, self.w_reply, self.w_disconnect])()
        if self.rng.random() < 0.5:
            frames[0] = self.flip(frames[0])
        else:
            frames[0] = frames[0][: self.rng.randrange(len(frames[0]))]
        return frames


# Kinds whose messages may pass the broker and reach the worker (the rest are refused by the broker itself).
DEEP_KINDS = frozenset({"bad_model", "params_garbage", "params_mutated", "image_mutated", "request_mutated", "depth_codec", "valid_variant"})


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def png_bomb(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + bytes(64)


def jpeg_bomb(jpeg: bytes, side: int) -> bytes:
    """A small JPEG whose frame header declares side x side, with a stray byte before it (libjpeg skips such bytes)."""
    import struct

    data = bytearray(jpeg)
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", side, side)
    return bytes(data[:at]) + b"\x00" + bytes(data[at:])


# ----------------------------------------------------------------------------- the run


class Tally:
    def __init__(self) -> None:
        self.sent: collections.Counter[str] = collections.Counter()  # by target
        self.frames: collections.Counter[str] = collections.Counter()  # ZeroMQ frames, by target
        self.kinds: collections.Counter[str] = collections.Counter()
        self.replies: collections.Counter[str] = collections.Counter()  # client port, by status
        self.worker_replies: collections.Counter[str] = collections.Counter()  # worker port, by command/reason
        self.codec: collections.Counter[str] = collections.Counter()  # depth_codec requests, by outcome (see CODEC_EXPECTED)
        self.duplicates = 0
        self.unknown_ids = 0


class Run:
    """The sockets, the sending loop and the bookkeeping of replies."""

    def __init__(self, clients: str, workers: str, fuzzer: Fuzzer, tally: Tally) -> None:
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.fuzzer, self.tally = fuzzer, tally
        self.clients_address, self.workers_address = clients, workers
        self.client_socks = [self._dealer(clients) for _ in range(CLIENT_SOCKETS)]
        self.worker_socks = [self._dealer(workers) for _ in range(WORKER_SOCKETS)]
        self.registered = self._dealer(workers)  # the fake worker that has the key
        self.outstanding = {sock: 0 for sock in self.client_socks}
        self.ids: dict[str, int] = {}  # ids sent at the client port -> replies seen
        self.deep: set[str] = set()  # ids of DEEP_KINDS messages not yet answered
        self.codec_expected: dict[str, bool] = {}  # ids of depth_codec requests not yet answered -> was the value "zstd"
        self.poller = zmq.Poller()
        for sock in (*self.client_socks, *self.worker_socks, self.registered):
            self.poller.register(sock, zmq.POLLIN)
        self.announce()

    def _dealer(self, address: str):
        sock = self.ctx.socket(self.zmq.DEALER)
        sock.setsockopt(self.zmq.LINGER, 0)
        sock.setsockopt(self.zmq.SNDHWM, 100_000)
        sock.setsockopt(self.zmq.RCVHWM, 100_000)
        apply_peer_security(sock, key=KEY, curve=None)  # past the handshake: the fuzzed headers are what is judged
        sock.connect(address)
        return sock

    def announce(self) -> None:
        self.registered.send_multipart([_pack({"v": self.fuzzer.version, "cmd": "ready", "key": KEY, "models": [FAKE_MODEL], "capacity": 1, "info": {"name": "fuzz-registered"}})])

    def send_client(self, index: int, message: tuple[str, list[bytes]] | None = None) -> None:
        kind, frames = message or self.fuzzer.client_message(deep=len(self.deep) < MAX_DEEP_OUTSTANDING)
        sock = self.client_socks[index % CLIENT_SOCKETS]
        try:
            header = _unpack_header(frames[0])
        except Exception:
            header = None
        if isinstance(header, dict) and _trackable(header.get("id")):
            self.ids.setdefault(header["id"], 0)
            if kind in DEEP_KINDS:
                self.deep.add(header["id"])
            if kind == "depth_codec":
                self.codec_expected[header["id"]] = _unpack_header(frames[1]).get("depth_codec") == "zstd"
        sock.send_multipart(frames, copy=False)
        self.outstanding[sock] += 1
        self.tally.sent["client port"] += 1
        self.tally.frames["client port"] += len(frames)
        self.tally.kinds[f"client:{kind}"] += 1

    def send_worker(self, index: int) -> None:
        if index % 5 == 0:  # the registered fake worker: heartbeats, REPLYs with random rids, unknown commands
            kind, frames = "w_registered", self.fuzzer.rng.choice([self.fuzzer.w_reply, self.fuzzer.w_heartbeat, self.fuzzer.w_unknown_cmd])()
            sock = self.registered
        else:
            kind, frames = self.fuzzer.worker_message()
            sock = self.worker_socks[index % WORKER_SOCKETS]
        sock.send_multipart(frames, copy=False)
        self.tally.sent["worker port"] += 1
        self.tally.frames["worker port"] += len(frames)
        self.tally.kinds[f"worker:{kind}"] += 1

    def pump(self, timeout_ms: int = 0) -> int:
        """Read every reply waiting now (waiting up to ``timeout_ms`` for the first); returns how many."""
        count = 0
        for sock, _ in self.poller.poll(timeout_ms):
            while True:
                try:
                    frames = sock.recv_multipart(self.zmq.NOBLOCK)
                except self.zmq.Again:
                    break
                count += 1
                if sock in self.outstanding:
                    self._client_reply(sock, frames)
                else:
                    self._worker_reply(sock, frames)
        return count

    def _client_reply(self, sock, frames: list[bytes]) -> None:
        self.outstanding[sock] -= 1
        header = _unpack_header(frames[0])
        status = header.get("status")
        request_id = header.get("id")
        label = str(status)
        if status == "ok":
            label = "ok (health)" if "health" in header else "ok (depth)"
        self.tally.replies[label] += 1
        if _trackable(request_id):
            self.deep.discard(request_id)
            if request_id in self.codec_expected:
                self.tally.codec[_codec_outcome(self.codec_expected.pop(request_id), header, frames[1:])] += 1
            seen = self.ids.get(request_id)
            if seen is None:
                self.tally.unknown_ids += 1
            elif seen >= 1:
                self.tally.duplicates += 1
            else:
                self.ids[request_id] = 1

    def _worker_reply(self, sock, frames: list[bytes]) -> None:
        header = _unpack_header(frames[0])
        cmd, reason = header.get("cmd"), header.get("reason")
        self.tally.worker_replies[f"{cmd} {reason}" if reason else str(cmd)] += 1
        if sock is self.registered and cmd == "disconnect":
            self.announce()  # told it is unknown (it sent DISCONNECT itself, or expired): register again

    def run_deep(self, per_kind: int) -> None:
        """``per_kind`` messages of each kind that reaches the worker: the warm-up goes through every heavy path."""
        index = 0
        for name in sorted(DEEP_KINDS):
            for _ in range(per_kind):
                while len(self.deep) >= MAX_DEEP_OUTSTANDING:
                    self.pump(100)
                self.send_client(index, (name, getattr(self.fuzzer, name)()))
                index += 1
                self.pump(0)

    def waiting(self) -> int:
        return sum(self.outstanding.values())

    def run(self, count: int, *, on_progress: Callable[[int], None] | None = None, oversize_at: set[int] = frozenset(), oversize: Callable[[], None] | None = None) -> None:
        rng = self.fuzzer.rng
        client_i = worker_i = 0
        for i in range(count):
            if i in oversize_at and oversize is not None:
                oversize()
            if rng.random() < 0.75:
                sock = self.client_socks[client_i % CLIENT_SOCKETS]
                while self.outstanding[sock] >= MAX_OUTSTANDING:
                    self.pump(100)
                self.send_client(client_i)
                client_i += 1
            else:
                self.send_worker(worker_i)
                worker_i += 1
            if i % 16 == 0:
                self.pump(0)
            if on_progress is not None and i % 1000 == 0:
                on_progress(i)

    def drain(self, timeout: float) -> None:
        """Wait until every client-port message is answered (or ``timeout``), reading everything."""
        deadline = time.monotonic() + timeout
        while self.waiting() > 0 and time.monotonic() < deadline:
            self.pump(100)
        end = time.monotonic() + 0.5  # anything more (a second reply would be a bug) arrives now
        while time.monotonic() < end:
            self.pump(50)

    def close(self) -> None:
        for sock in (*self.client_socks, *self.worker_socks, self.registered):
            sock.close(0)
        self.ctx.term()


def _trackable(request_id: Any) -> bool:
    """An id the fuzzer made unique (valid ones are random); the fixed bad ids ("", ...) repeat on purpose."""
    return isinstance(request_id, str) and 0 < len(request_id) <= 64


def _unpack_header(frame: bytes) -> dict:
    import msgpack

    obj = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    return obj if isinstance(obj, dict) else {}


CODEC_ZSTD_OK = "zstd: ok, depth compressed"
CODEC_NO_ZSTANDARD = "zstd: bad_request naming zstandard (not installed)"
CODEC_BAD_REFUSED = "bad value: bad_request naming depth_codec"
CODEC_EXPECTED = frozenset({CODEC_ZSTD_OK, CODEC_NO_ZSTANDARD, CODEC_BAD_REFUSED})


def _codec_outcome(zstd: bool, header: dict, frames: list[bytes]) -> str:
    """What a depth_codec request got, as one of CODEC_EXPECTED or a label saying what went wrong."""
    from zdepth.protocol import compression
    from zdepth.protocol.codec import decode_arrays

    status, message = header.get("status"), str(header.get("message", ""))
    if not zstd:
        return CODEC_BAD_REFUSED if status == "bad_request" and "depth_codec" in message else f"bad value: {status} {message[:80]!r}"
    if compression.zstd_missing():  # the worker runs with this interpreter's packages: it must say what is missing
        return CODEC_NO_ZSTANDARD if status == "bad_request" and "zstandard" in message else f"zstd without zstandard: {status} {message[:80]!r}"
    if status != "ok":
        return f"zstd: {status} {message[:80]!r}"
    descs = header.get("arrays")
    if not isinstance(descs, list) or not descs or not isinstance(descs[0], dict) or descs[0].get("codec") != "zstd":
        return "zstd: ok, but the depth came uncompressed"
    try:
        depth = decode_arrays(descs, frames)["depth"]
    except Exception as exc:  # noqa: BLE001 - any failure to decode is the finding
        return f"zstd: ok, but the depth does not decode: {exc}"[:120]
    return CODEC_ZSTD_OK if depth.shape == TINY else f"zstd: ok, but the depth is {depth.shape}"


def oversize_check(address: str, frames_before: list[bytes], huge, timeout: float = 10.0) -> bool:
    """Send a message with a frame over MAXMSGSIZE on a fresh socket: True if the broker dropped the connection."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_peer_security(sock, key=KEY, curve=None)
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(address)
        deadline = time.monotonic() + timeout
        connected = False
        while time.monotonic() < deadline:
            if monitor.poll(100):
                event = recv_monitor_message(monitor)["event"]
                if event == zmq.EVENT_CONNECTED and not connected:
                    connected = True
                    sock.send_multipart([*frames_before, huge], copy=False)
                elif event == zmq.EVENT_DISCONNECTED and connected:
                    return not sock.poll(200)  # dropped, and no reply came
        return False
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


def reference_results(address: str) -> dict[str, Any]:
    """A valid request of each op: relative, metric, and a point cloud computed on the server."""
    from zdepth import Client
    from zdepth.pointcloud import Intrinsics

    frame = small_frame()
    intrinsics = Intrinsics(fx=80.0, fy=80.0, cx=48.0, cy=32.0)
    with Client(address, key=KEY, timeout=60, retries=0, input_size=28) as client:
        return {
            "relative_depth": client.relative_depth(frame).depth,
            "metric_depth": client.metric_depth(frame).depth,
            "pointcloud": client.pointcloud(frame, intrinsics, on_server=True, colors=False).points,
        }


def warm_worker(address: str, fuzzer: Fuzzer, *, rounds: int = 2) -> None:
    """Full batches of every op at both sizes used here, so the worker's allocations are made before RSS is measured."""
    import zmq

    from zdepth.protocol.codec import image_descriptor, params_frame

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_peer_security(sock, key=KEY, curve=None)
    sock.connect(address)
    try:
        for _ in range(rounds):
            sent = 0
            for image, size in ((fuzzer.raw, DEEP_SIZE), (small_frame(), 28)):
                desc, array = image_descriptor(image)
                for op, model, intrinsics in (("relative_depth", "vits", None), ("metric_depth", "vits-hypersim", None), ("pointcloud", "vits-hypersim", [20.0, 20.0, 10.0, 8.0])):
                    params = params_frame(desc, input_size=size, intrinsics=intrinsics)
                    for _ in range(8):
                        sock.send_multipart([_pack(fuzzer.header(op=op, model=model, timeout_ms=120_000)), params, array])
                        sent += 1
            for _ in range(sent):
                if not sock.poll(120_000):
                    raise RuntimeError("the worker did not answer its warm-up requests")
                sock.recv_multipart()
        # A mutation that loses input_size (a flipped key) is inferred at the default, 518: its activations set the
        # allocator's high-water mark, which otherwise counted as growth whenever the first such request came after
        # the warm-up (seeds 1 and 6 of the short run failed so). One is enough: they are rare, so never batched.
        desc, array = image_descriptor(fuzzer.raw)
        sock.send_multipart([_pack(fuzzer.header(timeout_ms=120_000)), params_frame(desc), array])
        if not sock.poll(120_000):
            raise RuntimeError("the worker did not answer its warm-up request at the default input size")
        sock.recv_multipart()
    finally:
        sock.close(0)


def run_fuzz(args, weights_dir: Path, logs: Path) -> dict[str, Any]:
    import numpy as np

    from zdepth.config import MAX_MESSAGE_BYTES

    clients, workers = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    env = child_env(weights_dir, KEY)
    broker = broker_child("broker", clients, workers, logs, env, "--log-level", "warning").start()
    worker = worker_child("worker", workers, logs, env, ("vits", "vits-hypersim"), "--max-batch", "8", "--log-level", "warning").start()
    children = [broker, worker]
    tally = Tally()
    checks: dict[str, bool] = {}
    notes: list[str] = []
    samples: list[dict[str, Any]] = []
    try:
        wait_health(clients, KEY, workers=1, children=(broker, worker))
        reference = reference_results(clients)
        fuzzer = Fuzzer(random.Random(args.seed))
        run = Run(clients, workers, fuzzer, tally)
        huge = bytes(MAX_MESSAGE_BYTES + 1)
        oversize_results = {"client port": [], "worker port": []}

        def oversize() -> None:
            header = _pack({"v": 1, "id": uuid.uuid4().hex[:16], "key": KEY, "op": "relative_depth", "model": "vits"})
            oversize_results["client port"].append(oversize_check(clients, [header, fuzzer.params_raw], huge))
            oversize_results["worker port"].append(oversize_check(workers, [_pack({"v": 1, "cmd": "reply", "rid": 1, "status": "ok"})], huge))

        warmup = max(1000, args.frames // 20)
        started = time.monotonic()
        warm_worker(clients, fuzzer)
        run.run_deep(args.deep_warmup)
        run.run(warmup)
        run.drain(60)
        time.sleep(0.5)
        rss_start = {"broker": broker.rss(), "worker": worker.rss()}
        broker.rss_start, worker.rss_start = rss_start["broker"], rss_start["worker"]
        measured = time.monotonic()
        sent_before = sum(tally.sent.values())
        oversize_count = max(1, args.frames // 25_000) if args.oversize is None else args.oversize
        oversize_at = {int((k + 0.5) * args.frames / oversize_count) for k in range(oversize_count)} if oversize_count else set()

        def progress(i: int) -> None:
            if i % max(1000, args.frames // 10) == 0 and i:
                sample = {"frames": sent_before + i, "s": round(time.monotonic() - started, 1), "broker_mb": broker.rss(), "worker_mb": worker.rss()}
                samples.append(sample)
                print(f"  {sample['frames']:>7} frames, {sample['s']:6.1f} s, RSS broker {sample['broker_mb']:.1f} MB, worker {sample['worker_mb']:.1f} MB", flush=True)

        run.run(args.frames - warmup if args.frames > warmup else 0, on_progress=progress, oversize_at=oversize_at, oversize=oversize)
        fuzz_s = time.monotonic() - measured
        run.drain(args.drain_timeout)
        unanswered = run.waiting()
        total_s = time.monotonic() - started
        time.sleep(1.0)
        rss_end = {"broker": broker.rss(), "worker": worker.rss()}
        broker.rss_end, worker.rss_end = rss_end["broker"], rss_end["worker"]
        # Still serving, and the same answers as before.
        after = reference_results(clients)
        for op, expected in reference.items():
            same = after[op].shape == expected.shape and bool(np.allclose(after[op], expected, rtol=1e-4, atol=1e-5))
            checks[f"{op} result unchanged"] = same
        health = wait_health(clients, KEY, workers=1, timeout=10)
        real = [w for w in health["workers"] if w.get("pid") == worker.pid]
        checks["worker registered, same process"] = bool(real)
        checks["broker and worker alive"] = broker.alive() and worker.alive()
        checks["every client-port message answered"] = unanswered == 0
        checks["no request answered twice"] = tally.duplicates == 0
        checks["no reply with an id never sent"] = tally.unknown_ids == 0
        for port, results in oversize_results.items():
            if results:
                checks[f"oversized frames dropped ({port})"] = all(results)
        for name, bound in (("broker", args.rss_bound_mb), ("worker", args.rss_bound_mb)):
            growth = (rss_end[name] or 0) - (rss_start[name] or 0)
            checks[f"{name} RSS growth <= {bound:g} MB"] = rss_start[name] is not None and rss_end[name] is not None and growth <= bound
        checks["no 'internal' replies"] = tally.replies.get("internal", 0) == 0
        checks["depth_codec: zstd answered compressed, each bad value with bad_request"] = set(tally.codec) <= CODEC_EXPECTED
        broker_log = broker.log.read_text(errors="replace")
        worker_log = worker.log.read_text(errors="replace")
        checks["no unexpected error in the broker's log"] = "unexpected error" not in broker_log and "Traceback" not in broker_log
        checks["no traceback in the worker's log"] = "Traceback" not in worker_log
        run.close()
        return {
            "frames": dict(tally.sent),
            "frames_total": sum(tally.sent.values()),
            "zmq_frames": dict(tally.frames),
            "warmup_frames": warmup,
            "kinds": dict(sorted(tally.kinds.items())),
            "replies_client_port": dict(tally.replies.most_common()),
            "replies_worker_port": dict(tally.worker_replies.most_common()),
            "depth_codec": dict(tally.codec.most_common()),
            "unanswered": unanswered,
            "duplicates": tally.duplicates,
            "oversize": oversize_results,
            "rss_mb": {"start": rss_start, "end": rss_end, "samples": samples},
            "duration_s": {"total": total_s, "fuzz_after_warmup": fuzz_s},
            "rate_per_s": (sum(tally.sent.values()) - sent_before) / fuzz_s if fuzz_s else None,
            "checks": checks,
            "notes": notes,
            "passed": all(checks.values()),
        }
    finally:
        for child in reversed(children):
            child.stop(signal.SIGTERM, how="SIGTERM (end)", timeout=15)


def main(argv: list[str] | None = None) -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="messages to send, both ports together (a warm-up of 5%% of them is included)")
    parser.add_argument("--seed", type=int, default=1, help="random seed: a failing run can be replayed")
    parser.add_argument("--rss-bound-mb", type=float, default=30.0, help="largest RSS growth allowed, each process, end vs after the warm-up")
    parser.add_argument("--oversize", type=int, default=None, help="oversized messages per port (default: one per 25,000 frames)")
    parser.add_argument("--deep-warmup", type=int, default=150, help="warm-up messages of each kind that reaches the worker")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for the last replies")
    parser.add_argument("--weights-dir", help="checkpoints to use (default: generated or golden vits in a temporary folder)")
    parser.add_argument("--logs", help="folder for the broker's and worker's logs (default: a temporary folder, kept)")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames = min(args.frames, 3000)
    machine = _common.machine_info(torch_info=False)
    print(_common.machine_line(machine))
    weights_dir, source = _common.prepare_weights(args.weights_dir, ["vits"])
    link = weights_dir / "depth_anything_v2_metric_hypersim_vits.pth"
    if not link.exists():
        link.symlink_to((weights_dir / "depth_anything_v2_vits.pth").resolve())
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="zdepth-fuzz-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"weights: {source}; logs in {logs}; {args.frames} messages, seed {args.seed}")
    result = run_fuzz(args, weights_dir, logs)

    report = _common.Report()
    rows = []
    for target in ("client port", "worker port"):
        dropped = result["oversize"][target]
        rows.append({"target": target, "messages": result["frames"].get(target, 0), "zmq frames": result["zmq_frames"].get(target, 0), "oversized (dropped)": f"{sum(dropped)}/{len(dropped)}"})
    title = f"Fuzz: {result['frames_total']} messages in {result['duration_s']['total']:.0f} s ({_common.fmt(result['rate_per_s'])}/s after the warm-up), seed {args.seed}"
    report.table(rows, list(rows[0]), title=title)
    report.table([{"status": k, "replies": v} for k, v in result["replies_client_port"].items()], ["status", "replies"], title="Client port: replies by status")
    report.table([{"outcome": k, "requests": v} for k, v in result["depth_codec"].items()], ["outcome", "requests"], title="depth_codec requests: what came back")
    report.table([{"broker said": k, "messages": v} for k, v in result["replies_worker_port"].items()], ["broker said", "messages"], title="Worker port: what the broker answered the fake workers")
    rss = result["rss_mb"]
    report.table(
        [{"process": name, "rss_start_mb": rss["start"][name], "rss_end_mb": rss["end"][name], "growth_mb": (rss["end"][name] or 0) - (rss["start"][name] or 0)} for name in ("broker", "worker")],
        ["process", "rss_start_mb", "rss_end_mb", "growth_mb"],
        title=f"RSS (MB) after the warm-up ({result['warmup_frames']} messages) and at the end",
    )
    report.table([{"check": k, "passed": v} for k, v in result["checks"].items()], ["check", "passed"], title="Checks")
    report.note(("PASS" if result["passed"] else "FAIL") + f"; unanswered {result['unanswered']}, answered twice {result['duplicates']}; logs in {logs}")
    out = {"benchmark": NAME, "machine": machine, "report": report.parts, "weights": source, "config": vars(args), "logs": str(logs), **result}
    _common.write_json(NAME, out, args.json)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
