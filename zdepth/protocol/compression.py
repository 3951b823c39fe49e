"""Lossless compression of reply arrays on the wire: byte planes, then zstd level 1 (``"codec": "zstd"``).

A depth map's high bytes repeat (the map is smooth) and its low bytes are
noise, so splitting the array's bytes into planes (plane k = byte k of every
element, k = 0 .. itemsize-1, in that order) before zstd makes float16 depth
1.83x smaller instead of 1.45x (``benchmarks/depth_codec.py``). Worth it on a
1 GbE link, not on loopback or 10 GbE: hence an option, off by default.

``zstandard`` is optional (``pip install "zdepth[zstd]"``) and imported only
when something is compressed or decompressed, so that ``import zdepth``,
``zdepth.client`` and ``zdepth.broker`` never load it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from zdepth.errors import BadRequest

__all__ = ["CODECS", "ZSTD", "ZSTD_LEVEL", "compress", "decompress", "require_zstd", "zstd_missing"]

NONE, ZSTD = "none", "zstd"
CODECS = (NONE, ZSTD)  # the values of the request param ``depth_codec``
ZSTD_LEVEL = 1  # level 3 costs more CPU and gains little on depth maps
INSTALL_HINT = 'pip install "zdepth[zstd]"'


def require_zstd() -> Any:
    """The ``zstandard`` module; ImportError with the install hint when it is missing."""
    try:
        import zstandard
    except ImportError as exc:
        raise ImportError(f"depth_codec 'zstd' needs the zstandard package, which is not installed here: {INSTALL_HINT}") from exc
    return zstandard


def zstd_missing() -> str | None:
    """Why zstd cannot be used here (a message naming the package to install), or None when it can."""
    try:
        require_zstd()
    except ImportError as exc:
        return str(exc)
    return None


def planes(array: np.ndarray) -> np.ndarray:
    """The array's bytes as byte planes: byte 0 of every element, then byte 1, ... (one contiguous uint8 copy)."""
    contiguous = np.ascontiguousarray(array)
    return np.ascontiguousarray(contiguous.reshape(-1).view(np.uint8).reshape(-1, contiguous.dtype.itemsize).T)


def unplanes(data: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of ``planes``: a new writable array of ``dtype`` and ``shape``."""
    count, size = math.prod(shape), dtype.itemsize
    out = np.empty((count, size), np.uint8)
    out[...] = np.frombuffer(data, np.uint8).reshape(size, count).T
    return out.reshape(-1).view(dtype).reshape(shape)


def compress(array: np.ndarray) -> bytes:
    """zstd (level 1) of the array's byte planes; BadRequest naming the package when zstandard is missing."""
    missing = zstd_missing()
    if missing:
        raise BadRequest(missing)
    return require_zstd().ZstdCompressor(level=ZSTD_LEVEL).compress(planes(array))


def decompress(frame: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The array a ``compress`` frame holds, if it decompresses to exactly ``prod(shape) * itemsize`` bytes.

    Never allocates more than that: a frame whose header states another size
    is refused before anything is decompressed (zstandard would allocate the
    stated size whatever the bound), and one that states none is decompressed
    with that bound. Raises BadRequest for anything else (trailing bytes, a
    broken frame).
    """
    zstandard = require_zstd()
    expected = math.prod(shape) * dtype.itemsize
    what = f"a zstd array frame for dtype {dtype.str} and shape {list(shape)}"
    try:
        stated = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise BadRequest(f"{what} is not a zstd frame: {exc}") from exc
    if stated != -1 and stated != expected:  # -1: the size is not in the frame header
        raise BadRequest(f"{what} states {stated} bytes; it must hold exactly {expected}")
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max(expected, 1), allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise BadRequest(f"{what} does not decompress to {expected} bytes: {exc}") from exc
    if len(data) != expected:
        raise BadRequest(f"{what} decompresses to {len(data)} bytes; it must hold exactly {expected}")
    return unplanes(data, dtype, shape)
