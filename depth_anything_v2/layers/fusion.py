"""The DPT head's refinement blocks (RefineNet-style feature fusion)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: ``x + conv2(relu(conv1(relu(x))))``.

    The ReLUs are out of place because ``x`` is still needed for the skip.
    """

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """Merge a coarser path with a skip feature map, then upsample.

    ``size=None`` doubles the resolution (the last block); otherwise the
    output is resized to ``size``, the next finer level. Resizing is bilinear
    with ``align_corners=True`` as in the official head. The deepest block gets
    no skip, so its ``resConfUnit1`` is never used; it exists because the
    checkpoints hold weights for it and loading is strict.
    """

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(
        self, x: Tensor, skip: Tensor | None = None, *, size: tuple[int, int] | None = None
    ) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)
