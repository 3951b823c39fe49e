"""Input sizing, normalisation and output resizing around the model.

Two preprocessing paths exist. :func:`preprocess_cv2` reproduces the official
CPU pipeline bit for bit (it is what the golden tests pin).
:func:`preprocess_tensor` does the same steps with torch ops on batches, for
the GPU fast path; it agrees with the cv2 path only to float rounding.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PATCH_MULTIPLE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _multiple_at_least(x: float, bound: int) -> int:
    """Nearest multiple of 14 (numpy's round half to even), or the next one up
    if rounding fell below ``bound``; the official Resize's "lower_bound" rule."""
    y = round(x / PATCH_MULTIPLE) * PATCH_MULTIPLE
    if y < bound:
        y = math.ceil(x / PATCH_MULTIPLE) * PATCH_MULTIPLE
    return y


def network_input_size(height: int, width: int, input_size: int = 518) -> tuple[int, int]:
    """The ``(h, w)`` the network sees for an image of ``height x width``.

    Aspect ratio is kept, the short side becomes at least ``input_size``, and
    both sides are multiples of 14; for example 480x640 gives 518x686.
    """
    if not isinstance(input_size, int) or input_size <= 0 or input_size % PATCH_MULTIPLE:
        raise ValueError(
            f"input_size must be a positive multiple of {PATCH_MULTIPLE} (e.g. 518 or 364), "
            f"got {input_size!r}"
        )
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = max(input_size / height, input_size / width)
    new_height = _multiple_at_least(scale * height, input_size)
    new_width = _multiple_at_least(scale * width, input_size)
    return new_height, new_width


def preprocess_cv2(bgr_uint8: np.ndarray, input_size: int = 518) -> Tensor:
    """Official preprocessing of one ``[H, W, 3]`` uint8 BGR image (as from ``cv2.imread``).

    BGR to RGB, /255 in float64, ``cv2.INTER_CUBIC`` resize to
    :func:`network_input_size`, ImageNet mean/std, then float32.
    Returns a contiguous ``[1, 3, h, w]`` float32 CPU tensor.
    """
    if bgr_uint8.ndim != 3 or bgr_uint8.shape[2] != 3 or bgr_uint8.dtype != np.uint8:
        raise ValueError(
            f"expected an [H, W, 3] uint8 BGR image, got shape {bgr_uint8.shape} "
            f"and dtype {bgr_uint8.dtype}"
        )
    height, width = network_input_size(*bgr_uint8.shape[:2], input_size=input_size)
    image = cv2.cvtColor(bgr_uint8, cv2.COLOR_BGR2RGB) / 255.0
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
    image = (image - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    chw = np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)
    return torch.from_numpy(chw).unsqueeze(0)


def preprocess_tensor(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize and normalise an RGB batch ``[B, 3, H, W]`` on its own device.

    ``images`` is uint8 (0..255, returned as float32) or floating point in
    0..1 (its dtype is kept). Resizing is torch bicubic without antialias,
    the same kernel as cv2's INTER_CUBIC but not bit-identical to it
    (different arithmetic order and precision); use :func:`preprocess_cv2`
    where exact agreement with the official pipeline matters.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected an RGB batch [B, 3, H, W], got shape {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    if not x.is_floating_point():
        raise ValueError(f"expected uint8 or floating point images, got {images.dtype}")
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def resize_depth(depth: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``[B, h, w]`` predictions to ``size`` = ``(H, W)``.

    Bilinear with ``align_corners=True``, as the official pipeline does.
    """
    return F.interpolate(
        depth.unsqueeze(1), size=size, mode="bilinear", align_corners=True
    ).squeeze(1)
