"""What callers pass the engine, checked before any work: each problem is a BadRequest that fails only its request.

Torch-free, so the checks read the same wherever they are used.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from zdepth.engine.weights import ModelSpec
from zdepth.errors import BadRequest
from zdepth.models import input_size_problem
from zdepth.protocol.images import EncodedJpeg

__all__ = ["MaxDepth", "check_image", "check_input_size", "max_depths"]

MaxDepth = float | Sequence[float | None] | None


def check_input_size(input_size: object) -> None:
    problem = input_size_problem(input_size)
    if problem:
        raise BadRequest(problem)


def check_image(index: int, image: object) -> None:
    if isinstance(image, EncodedJpeg):
        return
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise BadRequest(f"image {index}: expected an HxWx3 uint8 BGR array (see zdepth.protocol.images.decode_image), got {described}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise BadRequest(f"image {index} is empty, shape {image.shape}")


def max_depths(spec: ModelSpec, max_depth: MaxDepth, count: int) -> list[float] | None:
    """One max_depth per image for a metric model, None for a relative one."""
    if isinstance(max_depth, (str, bytes)):
        raise BadRequest(f"max_depth must be a number or a list of numbers, got {max_depth!r}")
    single = max_depth is None or isinstance(max_depth, numbers.Real)
    values: list[object] = [max_depth] * count if single else list(max_depth)  # type: ignore[arg-type]
    if not spec.metric:
        if (single and max_depth is not None) or any(value is not None for value in values):
            raise BadRequest(
                f"model {spec.id!r} is relative and has no max_depth; "
                f"use a metric model (e.g. {spec.encoder}-hypersim) or leave max_depth out"
            )
        return None
    if len(values) != count:
        raise BadRequest(f"got {len(values)} max_depth values for {count} images; give one per image or a single one")
    scales = []
    for value in values:
        if value is None:
            value = spec.default_max_depth
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise BadRequest(f"max_depth must be a positive number of metres, got {value!r}")
        scales.append(float(value))
    return scales
