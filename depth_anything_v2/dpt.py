"""The DPT depth head and the full Depth Anything V2 model: tensor in, tensor out."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .configs import EncoderConfig, get_config
from .dinov2 import DinoVisionTransformer
from .layers import FeatureFusionBlock

HEAD_HIDDEN = 32
"""Width of the last hidden conv of the head, fixed in every released model."""


class _Scratch(nn.Module):
    """Fusion and output convs; a module of its own only because the official
    keys nest them under ``depth_head.scratch.``."""

    def __init__(self, out_channels: Sequence[int], features: int, activation: type[nn.Module]):
        super().__init__()
        c1, c2, c3, c4 = out_channels
        self.layer1_rn = nn.Conv2d(c1, features, kernel_size=3, padding=1, bias=False)
        self.layer2_rn = nn.Conv2d(c2, features, kernel_size=3, padding=1, bias=False)
        self.layer3_rn = nn.Conv2d(c3, features, kernel_size=3, padding=1, bias=False)
        self.layer4_rn = nn.Conv2d(c4, features, kernel_size=3, padding=1, bias=False)
        self.refinenet1 = FeatureFusionBlock(features)
        self.refinenet2 = FeatureFusionBlock(features)
        self.refinenet3 = FeatureFusionBlock(features)
        self.refinenet4 = FeatureFusionBlock(features)
        self.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, HEAD_HIDDEN, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(HEAD_HIDDEN, 1, kernel_size=1),
            activation(),
        )

    def forward(self, maps: Sequence[Tensor], out_size: tuple[int, int]) -> Tensor:
        l1 = self.layer1_rn(maps[0])
        l2 = self.layer2_rn(maps[1])
        l3 = self.layer3_rn(maps[2])
        l4 = self.layer4_rn(maps[3])
        path = self.refinenet4(l4, size=l3.shape[-2:])
        path = self.refinenet3(path, l3, size=l2.shape[-2:])
        path = self.refinenet2(path, l2, size=l1.shape[-2:])
        path = self.refinenet1(path, l1)
        out = self.output_conv1(path)
        out = F.interpolate(out, size=out_size, mode="bilinear", align_corners=True)
        return self.output_conv2(out)


class DPTHead(nn.Module):
    """Four token maps to a one-channel map at the input resolution.

    The maps are projected (1x1) and resized to 4x, 2x, 1x and 0.5x the patch
    grid (transposed convs, identity, a stride-2 conv) before fusion.
    The class token is not used (the released models have ``use_clstoken=False``).
    ``activation`` ends the head: ReLU for relative, Sigmoid for metric models.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        features: int,
        out_channels: Sequence[int],
        activation: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        c1, c2, _, c4 = out_channels
        self.projects = nn.ModuleList(
            nn.Conv2d(in_channels, c, kernel_size=1) for c in out_channels
        )
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c1, c1, kernel_size=4, stride=4),
                nn.ConvTranspose2d(c2, c2, kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(c4, c4, kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = _Scratch(out_channels, features, activation)

    def forward(
        self, tokens: Sequence[Tensor], grid: tuple[int, int], out_size: tuple[int, int]
    ) -> Tensor:
        """``tokens``: four ``[B, gh*gw, C]`` patch-token tensors; returns ``[B, 1, *out_size]``."""
        maps = []
        for x, project, resize in zip(tokens, self.projects, self.resize_layers, strict=True):
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *grid)
            maps.append(resize(project(x)))
        return self.scratch(maps, out_size)


class DepthAnythingV2(nn.Module):
    """Depth Anything V2: DINOv2 backbone (``pretrained``) and DPT head (``depth_head``).

    Takes an already normalised batch ``[B, 3, H, W]`` (H, W multiples of 14)
    and returns ``[B, H, W]`` at the same resolution, on the input's device
    and dtype. A relative model returns non-negative disparity-like values
    (larger is nearer). A metric model returns metres: ``sigmoid * max_depth``.
    Relative and metric checkpoints share every key; ``metric`` must be chosen
    by the caller from the checkpoint's name.
    """

    def __init__(self, config: EncoderConfig, *, metric: bool = False, max_depth: float = 20.0):
        super().__init__()
        if not max_depth > 0:
            raise ValueError(f"max_depth must be positive, got {max_depth!r}")
        self.config = config
        self.metric = metric
        self.max_depth = float(max_depth)
        self.pretrained = DinoVisionTransformer(
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            ffn=config.ffn,
            patch_size=config.patch_size,
            img_size=config.img_size,
        )
        self.depth_head = DPTHead(
            config.embed_dim,
            features=config.features,
            out_channels=config.out_channels,
            activation=nn.Sigmoid if metric else nn.ReLU,
        )

    def extra_repr(self) -> str:
        kind = f"metric, max_depth={self.max_depth}" if self.metric else "relative"
        return f"encoder={self.config.name}, {kind}"

    def forward(self, x: Tensor, max_depth: float | Tensor | None = None) -> Tensor:
        """Predict depth for ``x``; ``max_depth`` overrides the metric range for this call.

        ``max_depth`` may be a number or a tensor of shape ``[B]`` (one range
        per sample), and is only accepted by metric models.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a [B, 3, H, W] batch, got shape {tuple(x.shape)}")
        scale = self._depth_scale(max_depth, x.shape[0])  # validated before the heavy work
        height, width = x.shape[-2:]
        grid = (height // self.config.patch_size, width // self.config.patch_size)
        layers = self.pretrained.get_intermediate_layers(x, self.config.intermediate_layers)
        tokens = [patch_tokens for patch_tokens, _ in layers]
        depth = self.depth_head(tokens, grid, (height, width)).squeeze(1)
        if scale is None:
            return depth
        if isinstance(scale, Tensor):
            scale = scale.to(device=depth.device, dtype=depth.dtype)
        return depth * scale

    def _depth_scale(self, max_depth: float | Tensor | None, batch: int) -> float | Tensor | None:
        """The factor for the sigmoid output: None for relative models, else a
        number, a 0-d tensor or a ``[B, 1, 1]`` tensor."""
        if not self.metric:
            if max_depth is not None:
                raise ValueError("max_depth applies only to metric models; this model is relative")
            return None
        if max_depth is None:
            return self.max_depth
        if not isinstance(max_depth, Tensor):
            if not max_depth > 0:
                raise ValueError(f"max_depth must be positive, got {max_depth!r}")
            return float(max_depth)
        if max_depth.ndim == 0:
            return max_depth
        if max_depth.shape != (batch,):
            raise ValueError(
                f"max_depth tensor must have shape [{batch}] (one per sample), "
                f"got {list(max_depth.shape)}"
            )
        return max_depth.view(-1, 1, 1)


def build_model(
    encoder: str | EncoderConfig, *, metric: bool = False, max_depth: float = 20.0
) -> DepthAnythingV2:
    """A randomly initialised model for ``encoder`` ("vits", "vitb", "vitl", "vitg"
    or a custom :class:`EncoderConfig`); load weights with ``load_checkpoint``.

    ``max_depth`` is the metric default (20 for the hypersim/indoor, 80 for
    the vkitti/outdoor checkpoints) and is ignored by relative models.
    """
    config = encoder if isinstance(encoder, EncoderConfig) else get_config(encoder)
    return DepthAnythingV2(config, metric=metric, max_depth=max_depth)
