"""Architecture table for the four Depth Anything V2 encoders.

The numbers are those of the official release, so its checkpoints load
unchanged. Tests and experiments build custom (for example tiny) models by
constructing an :class:`EncoderConfig` directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

FfnType = Literal["mlp", "swiglufused"]
FFN_TYPES: tuple[FfnType, ...] = ("mlp", "swiglufused")


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """One model size: a DINOv2 backbone and the DPT head that reads it.

    ``intermediate_layers`` are 0-based block indices whose outputs feed the
    head. ``img_size`` is the training resolution; it fixes the positional
    embedding table at ``(img_size // patch_size) ** 2 + 1`` entries, which any
    other input size resizes on the fly.
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    features: int
    out_channels: tuple[int, int, int, int]
    intermediate_layers: tuple[int, int, int, int]
    ffn: FfnType = "mlp"
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 518

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.ffn not in FFN_TYPES:
            raise ValueError(f"unknown ffn {self.ffn!r}; choose one of {', '.join(FFN_TYPES)}")
        if len(self.out_channels) != 4 or len(self.intermediate_layers) != 4:
            raise ValueError("out_channels and intermediate_layers need exactly 4 entries each")
        if not all(0 <= i < self.depth for i in self.intermediate_layers):
            raise ValueError(
                f"intermediate_layers {self.intermediate_layers} must lie in [0, {self.depth})"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )


CONFIGS: Mapping[str, EncoderConfig] = MappingProxyType(
    {
        "vits": EncoderConfig(
            name="vits",
            embed_dim=384,
            depth=12,
            num_heads=6,
            features=64,
            out_channels=(48, 96, 192, 384),
            intermediate_layers=(2, 5, 8, 11),
        ),
        "vitb": EncoderConfig(
            name="vitb",
            embed_dim=768,
            depth=12,
            num_heads=12,
            features=128,
            out_channels=(96, 192, 384, 768),
            intermediate_layers=(2, 5, 8, 11),
        ),
        "vitl": EncoderConfig(
            name="vitl",
            embed_dim=1024,
            depth=24,
            num_heads=16,
            features=256,
            out_channels=(256, 512, 1024, 1024),
            intermediate_layers=(4, 11, 17, 23),
        ),
        "vitg": EncoderConfig(
            name="vitg",
            embed_dim=1536,
            depth=40,
            num_heads=24,
            features=384,
            out_channels=(1536, 1536, 1536, 1536),
            intermediate_layers=(9, 19, 29, 39),
            ffn="swiglufused",
        ),
    }
)
ENCODERS: tuple[str, ...] = tuple(CONFIGS)


def get_config(encoder: str) -> EncoderConfig:
    """Look up a released encoder by name; the error lists the valid names."""
    try:
        return CONFIGS[encoder]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}"
        ) from None
