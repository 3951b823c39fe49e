"""Image to patch tokens: one strided convolution."""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """``[B, C, H, W]`` image to ``[B, (H/p)*(W/p), dim]`` tokens, row-major.

    H and W must be multiples of the patch size: a silently cropped border
    would shift every prediction, so other sizes are rejected.
    """

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the patch size "
                f"{self.patch_size}; resize it first (see transforms.network_input_size)"
            )
        return self.proj(x).flatten(2).transpose(1, 2)
