"""Input sizing and pre/post-processing, against the official Resize rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from depth_anything_v2 import (
    network_input_size,
    preprocess_cv2,
    preprocess_tensor,
    resize_depth,
)


@pytest.mark.parametrize(
    ("height", "width", "input_size", "expected"),
    [
        (480, 640, 518, (518, 686)),  # DESIGN.md's example
        (640, 480, 518, (686, 518)),  # portrait
        (518, 518, 518, (518, 518)),
        (10, 10, 518, (518, 518)),  # tiny images are upscaled
        (20, 2000, 518, (518, 51800)),  # extreme aspect: short side still 518
        (2000, 20, 518, (51800, 518)),
        (480, 640, 364, (364, 490)),
        (1080, 1920, 518, (518, 924)),
        (300, 500, 518, (518, 868)),
        (518, 679, 518, (518, 672)),  # 48.5 patches: numpy rounds half to even
        (518, 693, 518, (518, 700)),  # 49.5 patches: up to the even 50
    ],
)
def test_network_input_size(
    height: int, width: int, input_size: int, expected: tuple[int, int]
) -> None:
    size = network_input_size(height, width, input_size)
    assert size == expected
    assert all(side % 14 == 0 and side >= input_size for side in size)


@pytest.mark.parametrize("input_size", [0, -14, 500, 518.0, True])
def test_invalid_input_size(input_size: object) -> None:
    with pytest.raises(ValueError, match="positive multiple of 14"):
        network_input_size(480, 640, input_size)  # type: ignore[arg-type]


def test_invalid_image_size() -> None:
    with pytest.raises(ValueError, match="0x640"):
        network_input_size(0, 640)


def test_preprocess_cv2_shape_dtype_and_channel_order() -> None:
    bgr = np.zeros((48, 64, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in BGR
    x = preprocess_cv2(bgr, input_size=56)
    assert x.shape == (1, 3, 56, 70) and x.dtype == torch.float32 and x.is_contiguous()
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    torch.testing.assert_close(x[0, :, 20, 30], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_preprocess_cv2_rejects_non_bgr_uint8() -> None:
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        preprocess_cv2(np.zeros((48, 64), np.uint8))
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        preprocess_cv2(np.zeros((48, 64, 3), np.float32))


def test_preprocess_tensor_close_to_cv2_path() -> None:
    """The torch path uses the same cubic kernel; only rounding differs (2e-4 on a real photo)."""
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    size = network_input_size(60, 80, 84)
    reference = preprocess_cv2(bgr, input_size=84)
    rgb = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1)[None]
    from_uint8 = preprocess_tensor(rgb, size)
    from_float = preprocess_tensor(rgb.double() / 255, size)
    assert from_uint8.dtype == torch.float32 and from_float.dtype == torch.float64
    torch.testing.assert_close(from_uint8, reference, rtol=0, atol=1e-3)
    torch.testing.assert_close(from_float.float(), reference, rtol=0, atol=1e-3)


def test_preprocess_tensor_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        preprocess_tensor(torch.zeros(3, 10, 10), (14, 14))
    with pytest.raises(ValueError, match="uint8 or floating"):
        preprocess_tensor(torch.zeros(1, 3, 10, 10, dtype=torch.int32), (14, 14))


def test_resize_depth_is_bilinear_align_corners() -> None:
    depth = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    resized = resize_depth(depth, (3, 3))
    assert resized.shape == (1, 3, 3)
    torch.testing.assert_close(
        resized[0], torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]])
    )
