"""Strict checkpoint loading and the errors it raises, with generated checkpoints.

Real weights cannot be downloaded here, so checkpoints are random models saved
in the official format: a flat state dict written with ``torch.save``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from depth_anything_v2 import (
    CheckpointError,
    DepthAnythingV2,
    build_model,
    guess_encoder,
    load_checkpoint,
)
from depth_anything_v2.checkpoint import compare_state_dict, unwrap_state_dict


@pytest.fixture(scope="module")
def state_dict() -> dict[str, Tensor]:
    torch.manual_seed(0)
    return build_model("vits").state_dict()


@pytest.fixture(scope="module")
def checkpoint_file(
    state_dict: dict[str, Tensor], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "depth_anything_v2_vits.pth"
    torch.save(state_dict, path)
    return path


@pytest.fixture
def fresh_vits() -> DepthAnythingV2:
    with torch.device("meta"):  # errors are raised before any tensor is touched
        return build_model("vits")


def _assert_equal_weights(model: DepthAnythingV2, state_dict: dict[str, Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, state_dict[key].float()), key


def test_official_format_loads_strictly(
    checkpoint_file: Path, state_dict: dict[str, Tensor]
) -> None:
    model = load_checkpoint(build_model("vits"), checkpoint_file)
    _assert_equal_weights(model, state_dict)


def test_metric_model_loads_the_same_file(
    checkpoint_file: Path, state_dict: dict[str, Tensor]
) -> None:
    model = load_checkpoint(build_model("vits", metric=True, max_depth=80.0), checkpoint_file)
    _assert_equal_weights(model, state_dict)


def test_fp16_checkpoint_loads_into_fp32_model(state_dict: dict[str, Tensor]) -> None:
    half = {k: v.half() for k, v in state_dict.items()}
    model = load_checkpoint(build_model("vits"), half)
    _assert_equal_weights(model, half)


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_unambiguous_wrapper_is_opened(state_dict: dict[str, Tensor], wrapper: str) -> None:
    assert unwrap_state_dict({wrapper: state_dict, "epoch": 3}) == state_dict


@pytest.mark.parametrize(
    "obj",
    [
        {"model": {"a": torch.zeros(1)}, "state_dict": {"a": torch.zeros(1)}},  # which one?
        {"model": {"a": torch.zeros(1)}, "extra": torch.zeros(1)},  # tensors outside the wrapper
        {"weights": {"a": torch.zeros(1)}},
        {"a": torch.zeros(1), "step": 3},
        {},
        [torch.zeros(1)],
    ],
    ids=["two-wrappers", "tensor-beside", "unknown-wrapper", "non-tensor", "empty", "list"],
)
def test_other_containers_are_refused(obj: object) -> None:
    with pytest.raises(CheckpointError, match="not a state dict"):
        unwrap_state_dict(obj)


def _rename(sd: dict[str, Tensor]) -> None:
    sd["pretrained.blocks.3.attn.qkv_renamed.weight"] = sd.pop(
        "pretrained.blocks.3.attn.qkv.weight"
    )


def _drop(sd: dict[str, Tensor]) -> None:
    del sd["depth_head.scratch.refinenet4.resConfUnit1.conv1.bias"]


def _reshape(sd: dict[str, Tensor]) -> None:
    sd["depth_head.scratch.output_conv2.2.weight"] = torch.zeros(2, 32, 1, 1)


@pytest.mark.parametrize(
    ("mutate", "expected_lines"),
    [
        (
            _rename,
            [
                "missing keys (1): pretrained.blocks.3.attn.qkv.weight",
                "unexpected keys (1): pretrained.blocks.3.attn.qkv_renamed.weight",
            ],
        ),
        (_drop, ["missing keys (1): depth_head.scratch.refinenet4.resConfUnit1.conv1.bias"]),
        (
            _reshape,
            [
                "mis-shaped keys (1): depth_head.scratch.output_conv2.2.weight "
                "(file [2, 32, 1, 1], model [1, 32, 1, 1])"
            ],
        ),
    ],
    ids=["renamed", "missing", "mis-shaped"],
)
def test_broken_checkpoint_error_names_file_encoder_and_keys(
    state_dict: dict[str, Tensor],
    tmp_path: Path,
    fresh_vits: DepthAnythingV2,
    mutate: Callable[[dict[str, Tensor]], None],
    expected_lines: list[str],
) -> None:
    broken = {k: v.half() for k, v in state_dict.items()}  # half the bytes to write
    mutate(broken)
    path = tmp_path / "depth_anything_v2_vits.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(fresh_vits, path)
    lines = str(info.value).splitlines()
    assert lines[0] == (
        f"checkpoint {str(path)!r} does not fit the vits model "
        "(the file looks like vits; expected vits)."
    )
    assert lines[1:-1] == expected_lines
    assert "official checkpoint" in lines[-1]


def test_path_for_errors_names_a_state_dict(
    state_dict: dict[str, Tensor], fresh_vits: DepthAnythingV2
) -> None:
    broken = dict(state_dict)
    _drop(broken)
    with pytest.raises(CheckpointError, match=r"checkpoint 'vits\.pth' does not fit"):
        load_checkpoint(fresh_vits, broken, path_for_errors="vits.pth")


def test_wrong_encoder_is_named_and_lists_are_truncated(checkpoint_file: Path) -> None:
    with torch.device("meta"):
        vitb = build_model("vitb")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(vitb, checkpoint_file)
    message = str(info.value)
    assert checkpoint_file.name in message
    assert "does not fit the vitb model (the file looks like vits; expected vitb)" in message
    assert "pretrained.pos_embed (file [1, 1370, 384], model [1, 1370, 768])" in message
    assert "... and" in message and len(message) < 3000


def test_nothing_loaded_on_mismatch(state_dict: dict[str, Tensor]) -> None:
    model = build_model("vits")
    before = model.pretrained.cls_token.detach().clone()
    broken = {k: v + 1 for k, v in state_dict.items() if k != "pretrained.norm.bias"}
    with pytest.raises(CheckpointError):
        load_checkpoint(model, broken)
    assert torch.equal(model.pretrained.cls_token, before)


def test_unreadable_file(tmp_path: Path, fresh_vits: DepthAnythingV2) -> None:
    path = tmp_path / "truncated.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*truncated\.pth"):
        load_checkpoint(fresh_vits, path)


def test_guess_encoder_from_meta_state_dicts() -> None:
    for encoder in ("vits", "vitb", "vitl", "vitg"):
        with torch.device("meta"):
            assert guess_encoder(build_model(encoder).state_dict()) == encoder
    assert guess_encoder({"depth_head.projects.0.weight": torch.zeros(1)}) is None


def test_unknown_size_is_described(fresh_vits: DepthAnythingV2) -> None:
    odd = {
        "pretrained.pos_embed": torch.zeros(1, 5, 40),
        "pretrained.blocks.2.ls1.gamma": torch.zeros(40),
    }
    with pytest.raises(CheckpointError, match=r"no released encoder \(embed dim 40, 3 blocks\)"):
        load_checkpoint(fresh_vits, odd)
    with pytest.raises(CheckpointError, match="no Depth Anything V2 model"):
        load_checkpoint(fresh_vits, {"backbone.weight": torch.zeros(1)})


def test_compare_state_dict_empty_when_identical(
    state_dict: dict[str, Tensor], fresh_vits: DepthAnythingV2
) -> None:
    assert not compare_state_dict(fresh_vits, state_dict)
