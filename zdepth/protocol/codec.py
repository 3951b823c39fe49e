"""Arrays, images and request parameters <-> ZeroMQ frames.

Arrays travel as one raw frame each, described in the header by
``{"name", "dtype", "shape"}`` (dtype in numpy's ``dtype.str`` spelling, for
example ``"<f4"``), so they are sent and received without copies or base64. A reply array may
also travel compressed (``"codec": "zstd"`` in its description, asked for by
the request param ``depth_codec``: ``zdepth.protocol.compression``).
Inside msgpack bodies, arrays in msgpack-numpy's encoding are also accepted,
but only after their dtype is checked: msgpack-numpy would unpickle an object
array, and nothing from the network is ever unpickled here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Sequence

import msgpack
import msgpack_numpy
import numpy as np

from zdepth.errors import BadRequest
from zdepth.models import input_size_problem
from zdepth.protocol import OP_POINTCLOUD, OP_RELATIVE, compression

# Plain numeric dtypes only: no objects, no structured (void) records, no strings.
ALLOWED_DTYPES = frozenset(
    np.dtype(t).str for t in ("u1", "i1", "<u2", "<i2", "<u4", "<i4", "<f2", "<f4", "<f8", "<i8", "<u8", "?")
)
MAX_DIMS = 4
MAX_PARAMS_BYTES = 64 * 1024
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
DEPTH_DTYPES = {"float32": np.float32, "float16": np.float16}
DEPTH_CODECS = compression.CODECS  # "none" (default) or "zstd": how the depth array of a reply travels


def check_dtype(dtype: Any) -> np.dtype:
    """The dtype named on the wire, if it is a plain little-endian numeric type."""
    if not isinstance(dtype, str):
        raise BadRequest(f"array dtype must be a string such as '<f4', got {type(dtype).__name__}")
    if dtype not in ALLOWED_DTYPES:
        raise BadRequest(f"array dtype {dtype!r} is not allowed; use one of {sorted(ALLOWED_DTYPES)}")
    return np.dtype(dtype)


def check_shape(shape: Any) -> tuple[int, ...]:
    if (
        not isinstance(shape, (list, tuple))
        or not 0 < len(shape) <= MAX_DIMS
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**31 for n in shape)
    ):
        raise BadRequest(f"array shape must be a list of 1 to {MAX_DIMS} non-negative ints, got {shape!r}")
    return tuple(shape)


def describe(name: str, array: np.ndarray) -> dict[str, Any]:
    return {"name": name, "dtype": array.dtype.str, "shape": list(array.shape)}


def array_frames(
    arrays: Mapping[str, np.ndarray], *, compressed: Collection[str] = ()
) -> tuple[list[dict[str, Any]], list[np.ndarray | bytes]]:
    """Descriptions for the header and C-contiguous arrays to send as frames (zero-copy).

    The arrays named in ``compressed`` go as zstd of their byte planes
    instead, described with ``"codec": "zstd"`` (dtype and shape stay those
    of the array).
    """
    descs, frames = [], []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        desc = describe(name, array)
        if name in compressed:
            desc["codec"] = compression.ZSTD
            frames.append(compression.compress(array))
        else:
            frames.append(array)
        descs.append(desc)
    return descs, frames


def decode_array(desc: Any, frame: bytes | memoryview) -> np.ndarray:
    """A read-only array viewing ``frame``; its size must match dtype and shape exactly."""
    if not isinstance(desc, dict):
        raise BadRequest("array description must be a map with 'dtype' and 'shape'")
    dtype = check_dtype(desc.get("dtype"))
    shape = check_shape(desc.get("shape"))
    expected = math.prod(shape) * dtype.itemsize
    if len(frame) != expected:
        raise BadRequest(f"array frame has {len(frame)} bytes; dtype {dtype.str} and shape {list(shape)} need {expected}")
    return np.frombuffer(frame, dtype=dtype).reshape(shape)


def decode_arrays(descs: Any, frames: Sequence[bytes | memoryview]) -> dict[str, np.ndarray]:
    """A reply's arrays by name; a frame described with a ``codec`` is decompressed, to exactly its dtype and shape."""
    if not isinstance(descs, list) or len(descs) != len(frames):
        raise BadRequest(f"header describes {len(descs) if isinstance(descs, list) else 0} arrays but {len(frames)} frames came")
    return {str(d.get("name")) if isinstance(d, dict) else str(i): _decode_reply_array(d, f) for i, (d, f) in enumerate(zip(descs, frames))}


def _decode_reply_array(desc: Any, frame: bytes | memoryview) -> np.ndarray:
    if not isinstance(desc, dict) or "codec" not in desc:
        return decode_array(desc, frame)
    name = desc["codec"]
    if name != compression.ZSTD:  # "none" is never sent: an uncompressed array has no codec field
        raise BadRequest(f"array codec {name!r} is unknown; this side reads {compression.ZSTD!r} (or no codec)")
    return compression.decompress(frame, check_dtype(desc.get("dtype")), check_shape(desc.get("shape")))


def _safe_ndarray_hook(obj: dict) -> Any:
    """msgpack-numpy's decoder, reached only for plain numeric dtypes."""
    if b"nd" in obj or "nd" in obj:
        kind = obj.get(b"kind", obj.get("kind", b""))
        dtype = obj.get(b"type", obj.get("type"))
        if kind not in (b"", "") or not isinstance(dtype, (bytes, str)):
            raise BadRequest("msgpack-numpy arrays must have a plain numeric dtype (object and void arrays are refused)")
        check_dtype(dtype.decode() if isinstance(dtype, bytes) else dtype)
        shape = obj.get(b"shape", obj.get("shape"))
        check_shape(list(shape) if isinstance(shape, (list, tuple)) else shape)
        data = obj.get(b"data", obj.get("data"))
        if not isinstance(data, bytes) or len(data) != math.prod(shape) * np.dtype(dtype).itemsize:
            raise BadRequest("msgpack-numpy array data does not match its dtype and shape")
        return msgpack_numpy.decode(obj)
    return obj


def unpack_body(frame: bytes | memoryview, *, what: str, limit: int = MAX_PARAMS_BYTES) -> dict[str, Any]:
    """A msgpack map body; numpy arrays in msgpack-numpy's encoding are decoded safely."""
    if len(frame) > limit:
        raise BadRequest(f"{what} is {len(frame)} bytes; the limit is {limit}")
    try:
        obj = msgpack.unpackb(frame, raw=False, object_hook=_safe_ndarray_hook, strict_map_key=False)
    except BadRequest:
        raise
    except Exception as exc:
        raise BadRequest(f"{what} is not valid msgpack: {exc}") from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise BadRequest(f"{what} must be a msgpack map with string keys")
    return obj


def pack_body(obj: Mapping[str, Any]) -> bytes:
    """msgpack with numpy arrays in msgpack-numpy's encoding."""
    return msgpack.packb(obj, default=msgpack_numpy.encode, use_bin_type=True)


# ----------------------------------------------------------------------------- images


def image_descriptor(image: bytes | np.ndarray) -> tuple[dict[str, Any], bytes | np.ndarray]:
    """How the image travels: encoded bytes as they are, or a raw array with dtype and shape."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return {"format": "encoded"}, bytes(image) if isinstance(image, bytearray) else image
    if isinstance(image, np.ndarray):
        array = np.ascontiguousarray(image)
        return {"format": "raw", "dtype": array.dtype.str, "shape": list(array.shape)}, array
    raise TypeError(f"image must be encoded bytes or a numpy array, got {type(image).__name__}")


def decode_image_frame(desc: Any, frame: bytes | memoryview, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes | np.ndarray:
    """The image as encoded bytes or an array view; pixel checks happen in imageio."""
    if len(frame) > max_bytes:
        raise BadRequest(f"image is {len(frame)} bytes; the limit is {max_bytes}")
    if not isinstance(desc, dict):
        raise BadRequest("params field 'image' must be a map with a 'format' of 'encoded' or 'raw'")
    fmt = desc.get("format")
    if fmt == "encoded":
        if len(frame) == 0:
            raise BadRequest("image frame is empty")
        return frame
    if fmt == "raw":
        return decode_array(desc, frame)
    raise BadRequest(f"image format {fmt!r} is unknown; use 'encoded' (JPEG/PNG bytes) or 'raw'")


# ----------------------------------------------------------------------------- request parameters


@dataclass(frozen=True)
class DepthParams:
    """Validated parameters of a model request (the msgpack frame after the header)."""

    image: dict[str, Any]
    input_size: int | None = None
    max_depth: float | None = None
    intrinsics: tuple[float, float, float, float] | None = None
    depth_dtype: str = "float32"
    depth_codec: str = compression.NONE


def _positive_number(params: dict[str, Any], name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise BadRequest(f"'{name}' must be a positive finite number, got {value!r}")
    return float(value)


def parse_params(op: str, frame: bytes | memoryview) -> DepthParams:
    """Check the params frame against the op; raises BadRequest naming the bad field."""
    params = unpack_body(frame, what="params frame")
    image = params.get("image")
    if not isinstance(image, dict):
        raise BadRequest("params field 'image' is missing; it describes the image frame")
    input_size = params.get("input_size")
    if input_size is not None:
        problem = input_size_problem(input_size)
        if problem:
            raise BadRequest(problem)
    max_depth = _positive_number(params, "max_depth")
    if max_depth is not None and op == OP_RELATIVE:
        raise BadRequest("'max_depth' applies to metric models only; use metric_depth with a metric model")
    intrinsics = params.get("intrinsics")
    if op == OP_POINTCLOUD:
        if isinstance(intrinsics, np.ndarray):
            intrinsics = intrinsics.tolist()
        if (
            not isinstance(intrinsics, (list, tuple))
            or len(intrinsics) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in intrinsics)
            or intrinsics[0] <= 0
            or intrinsics[1] <= 0
        ):
            raise BadRequest(f"'intrinsics' must be [fx, fy, cx, cy] with positive focal lengths, got {intrinsics!r}")
        intrinsics = tuple(float(v) for v in intrinsics)
    elif intrinsics is not None:
        raise BadRequest(f"'intrinsics' only applies to op {OP_POINTCLOUD!r}")
    depth_dtype = params.get("depth_dtype", "float32")
    if not isinstance(depth_dtype, str) or depth_dtype not in DEPTH_DTYPES:  # unhashable values must not raise TypeError
        raise BadRequest(f"'depth_dtype' must be one of {sorted(DEPTH_DTYPES)}, got {depth_dtype!r}")
    depth_codec = params.get("depth_codec", compression.NONE)
    if not isinstance(depth_codec, str) or depth_codec not in DEPTH_CODECS:
        raise BadRequest(f"'depth_codec' must be one of {sorted(DEPTH_CODECS)}, got {depth_codec!r}")
    return DepthParams(
        image=image, input_size=input_size, max_depth=max_depth, intrinsics=intrinsics, depth_dtype=depth_dtype, depth_codec=depth_codec
    )


def params_frame(
    image_desc: dict[str, Any],
    *,
    input_size: int | None = None,
    max_depth: float | None = None,
    intrinsics: Sequence[float] | None = None,
    depth_dtype: str = "float32",
    depth_codec: str = compression.NONE,
) -> bytes:
    params: dict[str, Any] = {"image": image_desc, "depth_dtype": depth_dtype}
    if depth_codec != compression.NONE:  # absent means "none": the default frame stays as it was
        params["depth_codec"] = depth_codec
    if input_size is not None:
        params["input_size"] = input_size
    if max_depth is not None:
        params["max_depth"] = max_depth
    if intrinsics is not None:
        params["intrinsics"] = [float(v) for v in intrinsics]
    return pack_body(params)

