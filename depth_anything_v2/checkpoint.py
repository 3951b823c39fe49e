"""Strict loading of official Depth Anything V2 checkpoints, with errors a person can act on.

Official files are flat state dicts (``pretrained.*`` backbone keys,
``depth_head.*`` head keys). Relative and metric checkpoints share every key
and shape: whether a file is metric cannot be detected from its contents, so
the caller decides from the file name (``depth_anything_v2_metric_*``) and
builds the model with ``metric=True`` and the right ``max_depth``.

The helpers here are pure functions on state dicts so they can be tested
without real weights.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .configs import CONFIGS

StateDict = Mapping[str, Tensor]

_WRAPPER_KEYS = ("model", "state_dict")
_BLOCK_KEY = re.compile(r"^pretrained\.blocks\.(\d+)\.")
_LIST_LIMIT = 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class StateDictMismatch:
    """How a state dict differs from a model's; empty means strict loading succeeds."""

    missing: list[str]
    unexpected: list[str]
    mis_shaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, file shape, model shape

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mis_shaped)


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """Return the flat ``{key: tensor}`` dict inside a loaded checkpoint.

    A ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper (as training
    scripts write) is opened only when it is unambiguous: exactly one such
    entry holding a dict of tensors, and no tensors beside it. Anything else
    raises ``CheckpointError``.
    """
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = [obj[k] for k in _WRAPPER_KEYS if k in obj]
        if len(inner) == 1 and _is_state_dict(inner[0]):
            return dict(inner[0])
    raise CheckpointError(
        "not a state dict: expected a flat {name: tensor} dict, or one wrapped under "
        f"exactly one of {_WRAPPER_KEYS} (got {type(obj).__name__})"
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def guess_encoder(state_dict: StateDict) -> str | None:
    """The released encoder whose width and depth match the state dict, if any.

    Width comes from ``pretrained.pos_embed``, depth from the highest
    ``pretrained.blocks.N`` index.
    """
    pos_embed = state_dict.get("pretrained.pos_embed")
    if pos_embed is None:
        return None
    depth = _num_blocks(state_dict)
    for name, config in CONFIGS.items():
        if config.embed_dim == pos_embed.shape[-1] and config.depth == depth:
            return name
    return None


def _num_blocks(state_dict: StateDict) -> int:
    indices = (int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key)))
    return 1 + max(indices, default=-1)


def _looks_like(state_dict: StateDict) -> str:
    name = guess_encoder(state_dict)
    if name is not None:
        return name
    pos_embed = state_dict.get("pretrained.pos_embed")
    if pos_embed is None:
        return "no Depth Anything V2 model (it has no pretrained.pos_embed)"
    return (
        f"no released encoder (embed dim {pos_embed.shape[-1]}, {_num_blocks(state_dict)} blocks)"
    )


def compare_state_dict(model: nn.Module, state_dict: StateDict) -> StateDictMismatch:
    """Missing, unexpected and mis-shaped keys of ``state_dict`` relative to ``model``."""
    expected = model.state_dict()
    return StateDictMismatch(
        missing=[k for k in expected if k not in state_dict],
        unexpected=[k for k in state_dict if k not in expected],
        mis_shaped=[
            (k, tuple(v.shape), tuple(expected[k].shape))
            for k, v in state_dict.items()
            if k in expected and v.shape != expected[k].shape
        ],
    )


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load a checkpoint file on the CPU without unpickling arbitrary objects."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {os.fspath(path)!r}: {exc}. Is it a complete, "
            "official Depth Anything V2 .pth file?"
        ) from exc
    try:
        return unwrap_state_dict(obj)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: {exc}") from None


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | StateDict,
    *,
    path_for_errors: str | None = None,
) -> nn.Module:
    """Load weights strictly into ``model`` (in place) and return it.

    Tensors are copied into the model's own dtype and device, so an fp16 file
    loads into an fp32 model. Nothing is loaded unless every key and shape
    matches; otherwise ``CheckpointError`` names the file (``path_for_errors``
    when a state dict is passed), the encoder the file looks like, the encoder
    expected, and the offending keys. A missing file raises ``FileNotFoundError``.
    Relative and metric checkpoints cannot be told apart here (see the module
    docstring).
    """
    if isinstance(path_or_state_dict, Mapping):
        state_dict = unwrap_state_dict(path_or_state_dict)
        source = path_for_errors or "<state dict>"
    else:
        state_dict = read_checkpoint(path_or_state_dict)
        source = path_for_errors or os.fspath(path_or_state_dict)
    mismatch = compare_state_dict(model, state_dict)
    if mismatch:
        raise CheckpointError(_describe(mismatch, state_dict, model, source))
    model.load_state_dict(state_dict, strict=True)
    return model


def _describe(
    mismatch: StateDictMismatch, state_dict: StateDict, model: nn.Module, source: str
) -> str:
    config = getattr(model, "config", None)
    expected = getattr(config, "name", type(model).__name__)
    lines = [
        f"checkpoint {source!r} does not fit the {expected} model "
        f"(the file looks like {_looks_like(state_dict)}; expected {expected}).",
    ]
    if mismatch.missing:
        lines.append(f"missing keys ({len(mismatch.missing)}): {_truncate(mismatch.missing)}")
    if mismatch.unexpected:
        lines.append(
            f"unexpected keys ({len(mismatch.unexpected)}): {_truncate(mismatch.unexpected)}"
        )
    if mismatch.mis_shaped:
        shapes = [f"{k} (file {list(a)}, model {list(b)})" for k, a, b in mismatch.mis_shaped]
        lines.append(f"mis-shaped keys ({len(shapes)}): {_truncate(shapes)}")
    lines.append(
        "Pick the encoder that matches the file, or check that it is an official checkpoint."
    )
    return "\n".join(lines)


def _truncate(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return f"{shown}, ... and {more} more" if more > 0 else shown
