"""Pre-norm transformer block with LayerScale on both residual branches."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from .attention import Attention
from .layer_scale import LayerScale
from .mlp import Mlp

LayerNorm = partial(nn.LayerNorm, eps=1e-6)
"""DINOv2's norm: LayerNorm with eps 1e-6 (PyTorch's default is 1e-5)."""

FfnFactory = Callable[..., nn.Module]
"""Called as ``ffn_layer(dim, hidden_features, act_layer=act_layer)``."""


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.

    Norm, activation and feed-forward are passed in as classes so the same
    block serves the GELU-MLP encoders and the SwiGLU ViT-g. Inference only:
    no dropout or stochastic depth, which are identities at eval time.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        init_values: float = 1.0,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        ffn_layer: FfnFactory = Mlp,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))
