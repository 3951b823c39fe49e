"""Architecture, shapes and max_depth semantics of the model (random weights, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from depth_anything_v2 import (
    CONFIGS,
    ENCODERS,
    DepthAnythingV2,
    EncoderConfig,
    build_model,
    get_config,
)
from depth_anything_v2.dinov2 import DinoVisionTransformer, interpolate_pos_embed

# From the official release (DESIGN.md, "Model facts").
PARAM_COUNTS = {
    "vits": 24_785_089,
    "vitb": 97_470_785,
    "vitl": 335_315_649,
    "vitg": 1_258_132_225,
}


@pytest.fixture(scope="module")
def relative_vits() -> DepthAnythingV2:
    torch.manual_seed(0)
    return build_model("vits").eval()


@pytest.fixture(scope="module")
def metric_vits(relative_vits: DepthAnythingV2) -> DepthAnythingV2:
    model = build_model("vits", metric=True, max_depth=20.0).eval()
    model.load_state_dict(relative_vits.state_dict())
    return model


def test_encoders_are_the_released_four() -> None:
    assert ENCODERS == ("vits", "vitb", "vitl", "vitg")


@pytest.mark.parametrize("encoder", ENCODERS)
def test_parameter_count_matches_official(encoder: str) -> None:
    with torch.device("meta"):  # no memory, no init cost: vitg is 1.26 B parameters
        model = build_model(encoder)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[encoder]


def test_vitg_uses_swiglu_with_official_width() -> None:
    with torch.device("meta"):
        model = build_model("vitg")
    mlp = model.pretrained.blocks[0].mlp
    assert tuple(mlp.w12.weight.shape) == (2 * 4096, 1536)
    assert tuple(mlp.w3.weight.shape) == (1536, 4096)


def test_unknown_encoder_names_value_and_choices() -> None:
    with pytest.raises(ValueError, match=r"'vith'.*vits, vitb, vitl, vitg"):
        build_model("vith")
    with pytest.raises(ValueError, match="vits, vitb"):
        get_config("ViT-S")


def test_configs_are_frozen_and_validated() -> None:
    with pytest.raises(AttributeError):
        CONFIGS["vits"].depth = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(
            name="bad",
            embed_dim=30,
            depth=4,
            num_heads=4,
            features=8,
            out_channels=(8, 8, 8, 8),
            intermediate_layers=(0, 1, 2, 3),
        )
    with pytest.raises(ValueError, match="intermediate_layers"):
        EncoderConfig(
            name="bad",
            embed_dim=32,
            depth=4,
            num_heads=4,
            features=8,
            out_channels=(8, 8, 8, 8),
            intermediate_layers=(0, 1, 2, 4),
        )


@pytest.mark.parametrize(
    ("height", "width"),
    [(14, 14), (70, 70), (70, 98), (98, 70), (42, 126), (28, 14)],
    ids=["one-patch", "square", "landscape", "portrait", "wide", "tall"],
)
def test_forward_shape(relative_vits: DepthAnythingV2, height: int, width: int) -> None:
    x = torch.randn(2, 3, height, width)
    with torch.inference_mode():
        depth = relative_vits(x)
    assert depth.shape == (2, height, width)
    assert depth.dtype == torch.float32
    assert (depth >= 0).all()


def test_rejects_sizes_off_the_patch_grid(relative_vits: DepthAnythingV2) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        relative_vits(torch.randn(1, 3, 70, 71))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        relative_vits(torch.randn(3, 70, 70))


def test_metric_max_depth_override_scales_exactly(metric_vits: DepthAnythingV2) -> None:
    x = torch.randn(2, 3, 42, 56)
    with torch.inference_mode():
        default = metric_vits(x)
        at20 = metric_vits(x, max_depth=20.0)
        at40 = metric_vits(x, max_depth=40)
        per_sample = metric_vits(x, max_depth=torch.tensor([20.0, 80.0]))
        scalar_tensor = metric_vits(x, max_depth=torch.tensor(40.0))
    assert torch.equal(default, at20)
    assert torch.equal(at40, 2 * at20)
    assert torch.equal(scalar_tensor, at40)
    assert torch.equal(per_sample[0], at20[0])
    assert torch.equal(per_sample[1], 4 * at20[1])
    assert ((at20 > 0) & (at20 < 20)).all()


def test_metric_max_depth_validation(
    metric_vits: DepthAnythingV2, relative_vits: DepthAnythingV2
) -> None:
    x = torch.randn(2, 3, 14, 14)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        metric_vits(x, max_depth=torch.tensor([20.0, 40.0, 80.0]))
    with pytest.raises(ValueError, match="positive"):
        metric_vits(x, max_depth=0.0)
    with pytest.raises(ValueError, match="only to metric"):
        relative_vits(x, max_depth=20.0)


def test_relative_and_metric_share_every_key(
    relative_vits: DepthAnythingV2, metric_vits: DepthAnythingV2
) -> None:
    relative, metric = relative_vits.state_dict(), metric_vits.state_dict()
    assert list(relative) == list(metric)
    assert all(relative[k].shape == metric[k].shape for k in relative)


def test_state_dict_has_no_buffers(relative_vits: DepthAnythingV2) -> None:
    """Official checkpoints hold parameters only; a buffer would break strict loading."""
    assert len(relative_vits.state_dict()) == len(list(relative_vits.parameters()))


def test_pos_embed_untouched_on_training_grid() -> None:
    pos_embed = torch.randn(1, 37 * 37 + 1, 8)
    assert interpolate_pos_embed(pos_embed, 37, 37, dtype=pos_embed.dtype) is pos_embed


@pytest.mark.parametrize(("grid_h", "grid_w"), [(37, 49), (26, 35), (5, 7), (40, 40), (36, 36)])
def test_pos_embed_resized_with_dinov2_offset(grid_h: int, grid_w: int) -> None:
    """Off the 37x37 grid the table is resized with scale (n + 0.1) / 37, not to a size."""
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 37 * 37 + 1, 8)
    resized = interpolate_pos_embed(pos_embed, grid_h, grid_w, dtype=pos_embed.dtype)
    assert resized.shape == (1, grid_h * grid_w + 1, 8)
    assert torch.equal(resized[:, 0], pos_embed[:, 0])

    grid = pos_embed[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    scale = ((grid_h + 0.1) / 37, (grid_w + 0.1) / 37)
    dinov2 = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    by_size = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", antialias=False)
    assert torch.equal(resized[:, 1:], dinov2.permute(0, 2, 3, 1).reshape(1, -1, 8))
    assert not torch.allclose(dinov2, by_size, atol=1e-4)


def test_pos_embed_interpolated_in_float32_and_cast_back() -> None:
    pos_embed = torch.randn(1, 37 * 37 + 1, 8).half()
    resized = interpolate_pos_embed(pos_embed, 10, 12, dtype=torch.float16)
    reference = interpolate_pos_embed(pos_embed.float(), 10, 12, dtype=torch.float32)
    assert resized.dtype == torch.float16
    assert torch.equal(resized, reference.half())


@pytest.mark.parametrize(("height", "width"), [(518, 518), (518, 532), (70, 98)])
def test_backbone_adds_pos_embed_for_the_input_grid(height: int, width: int) -> None:
    torch.manual_seed(0)
    vit = DinoVisionTransformer(embed_dim=8, depth=1, num_heads=2)
    x = torch.randn(1, 3, height, width)
    with torch.no_grad():
        tokens = vit.prepare_tokens(x)
        patches = vit.patch_embed(x)
        pos = interpolate_pos_embed(vit.pos_embed, height // 14, width // 14, dtype=x.dtype)
    assert tokens.shape == (1, 1 + (height // 14) * (width // 14), 8)
    assert torch.equal(tokens, torch.cat((vit.cls_token, patches), dim=1) + pos)
    assert (pos is vit.pos_embed) == (height == width == 518)


def test_resized_pos_embed_is_cached_for_inference_only() -> None:
    """The resize costs ~3 ms on a GPU per forward: inference computes it once per grid; a forward that
    records gradients, or new weights, never sees a stale table."""
    torch.manual_seed(0)
    vit = DinoVisionTransformer(embed_dim=8, depth=1, num_heads=2)
    x = torch.randn(2, 3, 70, 98)
    with torch.inference_mode():
        first = vit.prepare_tokens(x)
        table = vit._pos_embed_for(5, 7, x.dtype)
        assert vit._pos_embed_for(5, 7, x.dtype) is table and len(vit._pos_cache) == 1
        assert torch.equal(vit.prepare_tokens(x), first)
        vit.prepare_tokens(torch.randn(1, 3, 42, 42))
        assert len(vit._pos_cache) == 2  # one table per grid
    with torch.enable_grad():
        recorded = vit.prepare_tokens(x)
    assert recorded.requires_grad and torch.equal(recorded.detach(), first)
    state = vit.state_dict()
    state["pos_embed"] = state["pos_embed"] * 2
    vit.load_state_dict(state)
    with torch.no_grad():
        moved = vit.prepare_tokens(x)
        expected = vit.patch_embed(x)
        expected = torch.cat((vit.cls_token.expand(2, -1, -1), expected), dim=1) + interpolate_pos_embed(vit.pos_embed, 5, 7, dtype=x.dtype)
    assert torch.equal(moved, expected) and not torch.equal(moved, first)
