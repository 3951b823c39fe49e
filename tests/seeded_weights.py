"""Depth Anything V2 vits weights regenerated from a seed, for the golden tests.

tests/data/golden holds the official pipeline's outputs for these weights, so the
tests need no checkpoint file: the recipe below is the whole of it (see
tests/data/golden/README.md). Key names and shapes come from our own model, which
loads official checkpoints strictly, so they are the official ones.
"""

from __future__ import annotations

import math

import numpy as np

SEED = 20261130
FINAL_CONV = "depth_head.scratch.output_conv2.2"


def _rule(key: str, shape: tuple[int, ...]) -> tuple[float, float] | None:
    """(mean, std) for one tensor; None for the final bias, which is 2.0 everywhere."""
    fan_in = math.prod(shape[1:])  # literally, even for a transposed conv's (in, out, k, k)
    if key == f"{FINAL_CONV}.bias":
        return None
    if key == f"{FINAL_CONV}.weight":
        return 0.0, 2.0 / math.sqrt(fan_in)
    if key.endswith(".bias") or key.endswith(("pos_embed", "cls_token", "mask_token")):
        return 0.0, 0.02
    if len(shape) == 1:
        return 1.0, 0.02
    return 0.0, 1.0 / math.sqrt(fan_in)


def seeded_arrays(shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict[str, np.ndarray]:
    """float32 arrays for ``shapes`` (key -> shape). Keys are drawn in sorted order, one
    standard-normal draw per key (even the constant one), from numpy's legacy RandomState, whose
    stream never changes between numpy versions."""
    rng = np.random.RandomState(seed)
    arrays = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        noise = rng.standard_normal(size=shape)
        rule = _rule(key, shape)
        if rule is None:
            arrays[key] = np.full(shape, 2.0, dtype=np.float32)
        else:
            mean, std = rule
            arrays[key] = (mean + std * noise).astype(np.float32)
    return arrays


def seeded_state_dict(seed: int = SEED) -> dict:
    """The seeded vits state dict as float32 torch tensors; loads strictly as the relative and
    as the metric model (they share every key)."""
    import torch

    from depth_anything_v2 import build_model

    shapes = {key: tuple(value.shape) for key, value in build_model("vits").state_dict().items()}
    return {key: torch.from_numpy(array) for key, array in seeded_arrays(shapes, seed).items()}


def fingerprint(state: dict) -> dict[str, object]:
    """[sum, sum of absolute values] (float64) per tensor, and ``total_sum`` over all of them: the
    numbers tests/data/golden/weights_fingerprint.json records."""
    values = {key: np.asarray(value, dtype=np.float64) for key, value in state.items()}
    out: dict[str, object] = {key: [float(v.sum()), float(np.abs(v).sum())] for key, v in values.items()}
    out["total_sum"] = float(sum(v.sum() for v in values.values()))
    return out
