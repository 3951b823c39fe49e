"""Equivalence with transformers' DepthAnythingForDepthEstimation on tiny random models.

Weights go from our (official) key layout to transformers' with the mapping of
its official-to-HF conversion, so this also checks that our layout is the
official one. Pinned against transformers 5.24.0, whose key names (q_proj,
gate_proj, ...) differ from 4.x.

Positional embeddings: off the 37x37 training grid, transformers' Dinov2
resizes them with ``F.interpolate(size=(h // 14, w // 14))``, whereas
DINOv2 and the official Depth Anything V2 pass
``scale_factor=((h // 14 + 0.1) / 37, (w // 14 + 0.1) / 37)``, which samples
slightly different points. So off 518x518 transformers does not reproduce the
official outputs; to compare everything else we swap DINOv2's rule into the
transformers model, and assert that without the swap the outputs differ.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

transformers = pytest.importorskip("transformers")

from depth_anything_v2 import DepthAnythingV2, EncoderConfig, build_model  # noqa: E402
from depth_anything_v2.dinov2 import interpolate_pos_embed  # noqa: E402

TOLERANCE = 1e-5  # relative L2
MAX_DEPTH = 20  # transformers 5.24 types DepthAnythingConfig.max_depth as int


def _tiny_config(ffn: str) -> EncoderConfig:
    return EncoderConfig(
        name=f"tiny-{ffn}",
        embed_dim=32,
        depth=4,
        num_heads=2,
        features=16,
        out_channels=(8, 16, 32, 32),
        intermediate_layers=(0, 1, 2, 3),
        ffn=ffn,  # type: ignore[arg-type]
    )


def _transformers_model(config: EncoderConfig, *, metric: bool) -> torch.nn.Module:
    backbone = transformers.Dinov2Config(
        image_size=config.img_size,
        patch_size=config.patch_size,
        hidden_size=config.embed_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        mlp_ratio=int(config.mlp_ratio),
        use_swiglu_ffn=config.ffn == "swiglufused",
        out_indices=[i + 1 for i in config.intermediate_layers],  # stage 0 is the embeddings
        reshape_hidden_states=False,
    )
    hf_config = transformers.DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=config.patch_size,
        reassemble_hidden_size=config.embed_dim,
        neck_hidden_sizes=list(config.out_channels),
        fusion_hidden_size=config.features,
        depth_estimation_type="metric" if metric else "relative",
        max_depth=MAX_DEPTH if metric else 1,  # the relative head multiplies by it too
    )
    # Eager attention is the textbook softmax(qk^T)v, a check on our SDPA path.
    hf_config._attn_implementation = "eager"
    hf_config.backbone_config._attn_implementation = "eager"
    return transformers.DepthAnythingForDepthEstimation(hf_config).eval()


_EMBEDDINGS = {
    "pretrained.cls_token": "backbone.embeddings.cls_token",
    "pretrained.mask_token": "backbone.embeddings.mask_token",
    "pretrained.pos_embed": "backbone.embeddings.position_embeddings",
}


def _module_renames(config: EncoderConfig) -> dict[str, str]:
    """Our module paths to transformers' for modules whose tensors map one to one."""
    names = {
        "pretrained.patch_embed.proj": "backbone.embeddings.patch_embeddings.projection",
        "pretrained.norm": "backbone.layernorm",
        "depth_head.scratch.output_conv1": "head.conv1",
        "depth_head.scratch.output_conv2.0": "head.conv2",
        "depth_head.scratch.output_conv2.2": "head.conv3",
    }
    for i in range(config.depth):
        ours, theirs = f"pretrained.blocks.{i}", f"backbone.encoder.layer.{i}"
        for a, b in [
            ("norm1", "norm1"),
            ("norm2", "norm2"),
            ("attn.proj", "attention.o_proj"),
            ("ls1", "layer_scale1"),
            ("ls2", "layer_scale2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
            ("mlp.w3", "mlp.down_proj"),
        ]:
            names[f"{ours}.{a}"] = f"{theirs}.{b}"
    for i in range(4):
        names[f"depth_head.projects.{i}"] = f"neck.reassemble_stage.layers.{i}.projection"
        names[f"depth_head.resize_layers.{i}"] = f"neck.reassemble_stage.layers.{i}.resize"
        names[f"depth_head.scratch.layer{i + 1}_rn"] = f"neck.convs.{i}"
        # refinenet4 (the deepest) runs first: it is transformers' fusion layer 0.
        ours, theirs = f"depth_head.scratch.refinenet{i + 1}", f"neck.fusion_stage.layers.{3 - i}"
        names[f"{ours}.out_conv"] = f"{theirs}.projection"
        for unit in (1, 2):
            for conv in (1, 2):
                names[f"{ours}.resConfUnit{unit}.conv{conv}"] = (
                    f"{theirs}.residual_layer{unit}.convolution{conv}"
                )
    return names


def _to_transformers(sd: dict[str, Tensor], config: EncoderConfig) -> dict[str, Tensor]:
    """Official Depth Anything V2 keys to transformers 5.x DepthAnythingForDepthEstimation keys.

    Every key of ours must map (KeyError otherwise); strict loading on the
    transformers side checks the other direction.
    """
    renames = _module_renames(config)
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in _EMBEDDINGS:
            out[_EMBEDDINGS[key]] = value
            continue
        module, leaf = key.rsplit(".", 1)
        block = module.rsplit(".", 2)[0].replace("pretrained.blocks", "backbone.encoder.layer")
        if module.endswith("attn.qkv"):  # rows: all of q, then k, then v
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                out[f"{block}.attention.{name}.{leaf}"] = part
        elif module.endswith("mlp.w12"):  # rows: the gate (SiLU'd) half, then the value half
            for name, part in zip(("gate_proj", "up_proj"), value.chunk(2), strict=True):
                out[f"{block}.mlp.{name}.{leaf}"] = part
        else:
            out[f"{renames[module]}.{'lambda1' if leaf == 'gamma' else leaf}"] = value
    return out


def _use_dinov2_pos_embed_rule(hf_model: torch.nn.Module) -> None:
    embeddings = hf_model.backbone.embeddings
    patch = embeddings.patch_embeddings.patch_size[0]

    def interpolate(tokens: Tensor, height: int, width: int) -> Tensor:
        return interpolate_pos_embed(
            embeddings.position_embeddings, height // patch, width // patch, dtype=tokens.dtype
        )

    embeddings.interpolate_pos_encoding = interpolate


def _pair(ffn: str, metric: bool) -> tuple[DepthAnythingV2, torch.nn.Module]:
    torch.manual_seed(0)
    config = _tiny_config(ffn)
    ours = build_model(config, metric=metric, max_depth=MAX_DEPTH).eval()
    with torch.no_grad():
        # Break init symmetries (unit norms and gammas, zero biases) so mix-ups show.
        for param in ours.parameters():
            param.add_(0.05 * torch.randn_like(param))
        # A random head is nearly constant (the relative one all zeros after ReLU);
        # amplify its last conv so the outputs have structure worth comparing.
        last = ours.depth_head.scratch.output_conv2[2]
        last.weight.mul_(50.0)
        last.bias.zero_()
    theirs = _transformers_model(config, metric=metric)
    theirs.load_state_dict(_to_transformers(ours.state_dict(), config), strict=True)
    return ours, theirs


def _relative_l2(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(
    scope="module",
    params=[("mlp", False), ("mlp", True), ("swiglufused", False), ("swiglufused", True)],
    ids=lambda p: f"{p[0]}-{'metric' if p[1] else 'relative'}",
)
def pair(request: pytest.FixtureRequest) -> tuple[DepthAnythingV2, torch.nn.Module]:
    ours, theirs = _pair(*request.param)
    _use_dinov2_pos_embed_rule(theirs)
    return ours, theirs


@pytest.mark.parametrize(
    "size", [(518, 518), (364, 518), (252, 182)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_matches_transformers(
    pair: tuple[DepthAnythingV2, torch.nn.Module], size: tuple[int, int]
) -> None:
    ours, theirs = pair
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = theirs(pixel_values=x).predicted_depth
        actual = ours(x)
    assert actual.shape == expected.shape == (1, *size)
    assert expected.std() > 0.1 * expected.abs().mean()  # a non-trivial map
    assert _relative_l2(actual, expected) <= TOLERANCE


def test_transformers_pos_embed_rule_differs_off_the_training_grid() -> None:
    ours, theirs = _pair("mlp", metric=False)
    x = torch.randn(1, 3, 364, 518, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        unpatched = theirs(pixel_values=x).predicted_depth
        actual = ours(x)
    assert _relative_l2(actual, unpatched) > 100 * TOLERANCE
