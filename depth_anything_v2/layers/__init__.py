"""Building blocks of the DINOv2 backbone and the DPT head."""

from .attention import Attention
from .block import Block, LayerNorm
from .fusion import FeatureFusionBlock, ResidualConvUnit
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .swiglu import SwiGLUFFN, swiglu_hidden_features

__all__ = [
    "Attention",
    "Block",
    "FeatureFusionBlock",
    "LayerNorm",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "ResidualConvUnit",
    "SwiGLUFFN",
    "swiglu_hidden_features",
]
