"""The DINOv2 vision transformer, as used (without registers) by Depth Anything V2."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import FfnType
from .layers import Block, LayerNorm, Mlp, PatchEmbed, SwiGLUFFN

# The ffn name in the config picks the feed-forward class and its activation.
_FFNS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "mlp": (Mlp, nn.GELU),
    "swiglufused": (SwiGLUFFN, nn.SiLU),
}

INTERPOLATE_OFFSET = 0.1
"""DINOv2 (without registers) adds this to the target grid when resizing pos_embed."""
POS_CACHE_SIZE = 16  # resized position tables kept per model (one per network input size)


def interpolate_pos_embed(
    pos_embed: Tensor, grid_h: int, grid_w: int, *, dtype: torch.dtype
) -> Tensor:
    """Resize a ``[1, 1 + S*S, C]`` table (class token first) to a ``grid_h x grid_w`` grid.

    This reproduces DINOv2 exactly, because its checkpoints were trained with
    it: the table is returned untouched only for the training grid (S x S);
    otherwise the patch part is resized bicubically (no antialias, in float32)
    with ``scale_factor=((grid_h + 0.1) / S, (grid_w + 0.1) / S)``. Because a
    scale factor rather than an output size is passed, ``F.interpolate`` maps
    coordinates with that slightly-off scale, so the result is *not* what
    ``size=(grid_h, grid_w)`` gives (outputs drift by up to about 1%).
    Official code tests ``npatch == N and w == h`` on the pixel size; since
    inputs are multiples of the patch size this is the same as ``grid == S x S``.
    """
    side = math.isqrt(pos_embed.shape[1] - 1)
    if grid_h == side and grid_w == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    pos_embed = pos_embed.float()
    patch = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(
        patch,
        scale_factor=((grid_h + INTERPOLATE_OFFSET) / side, (grid_w + INTERPOLATE_OFFSET) / side),
        mode="bicubic",
        antialias=False,
    )
    if patch.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(
            f"pos_embed resized to {tuple(patch.shape[-2:])}, wanted {(grid_h, grid_w)}"
        )
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((pos_embed[:, :1], patch), dim=1).to(dtype)


class DinoVisionTransformer(nn.Module):
    """ViT backbone whose attribute names match the official ``pretrained.*`` keys.

    ``mask_token`` is unused at inference but present in every official
    checkpoint, so it is kept for strict loading.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn: FfnType = "mlp",
        patch_size: int = 14,
        img_size: int = 518,
    ):
        super().__init__()
        self.patch_size = patch_size
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        ffn_layer, act_layer = _FFNS[ffn]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, ffn_layer=ffn_layer, act_layer=act_layer
            )
            for _ in range(depth)
        )
        self.norm = LayerNorm(embed_dim)
        # Non-trivial embeddings so that random models exercise the interpolation.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self._pos_cache: dict[tuple, Tensor] = {}

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` image to ``[B, 1 + N, C]`` tokens with positions added."""
        height, width = x.shape[-2:]
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        return tokens + self._pos_embed_for(grid_h, grid_w, tokens.dtype)

    def _pos_embed_for(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> Tensor:
        """The position table for a grid; cached when no gradient is recorded.

        On a GPU, resizing the table costs about 3 ms (the bicubic kernel runs
        one thread per output position and loops over the channels): more than
        the rest of a vits forward pass at batch 1. It depends only on the grid,
        so inference computes it once per input size. The key holds the
        parameter's version, so loading new weights recomputes it.
        """
        if torch.is_grad_enabled() or _compiling():
            return interpolate_pos_embed(self.pos_embed, grid_h, grid_w, dtype=dtype)
        table = self.pos_embed
        key = (grid_h, grid_w, dtype, table.device, table.data_ptr(), table._version)
        cached = self._pos_cache.get(key)
        if cached is None:
            if len(self._pos_cache) >= POS_CACHE_SIZE:
                self._pos_cache.clear()
            cached = self._pos_cache[key] = interpolate_pos_embed(table, grid_h, grid_w, dtype=dtype)
        return cached

    def get_intermediate_layers(
        self, x: Tensor, indices: Sequence[int]
    ) -> list[tuple[Tensor, Tensor]]:
        """Outputs of blocks ``indices`` (0-based), each passed through the final norm.

        Returns one ``(patch_tokens [B, N, C], class_token [B, C])`` pair per
        index, in the order given. Blocks after the last index are skipped.
        """
        x = self.prepare_tokens(x)
        wanted = set(indices)
        outputs: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks[: max(indices) + 1]):
            x = block(x)
            if i in wanted:
                outputs[i] = self.norm(x)
        return [(outputs[i][:, 1:], outputs[i][:, 0]) for i in indices]


def _compiling() -> bool:
    """Whether torch.compile is tracing (it fuses the resize itself; a Python cache would only break its graph)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())
