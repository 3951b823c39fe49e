"""End-to-end agreement with the official pipeline's outputs (tests/data/golden).

The references were produced by the official code (cv2 preprocessing, fp32 on
the CPU, bilinear resize back) from weights regenerated from a seed
(tests/seeded_weights.py), so our fp32 CPU pipeline must match to float rounding.
Every case has a non-square network input (518x686, 364x602, ...), which pins
the DINOv2 positional-embedding resize rule: a size-based resize is off by about
2e-3 here.
"""

from __future__ import annotations

import json
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from conftest import data_file
from depth_anything_v2 import DepthAnythingV2, build_model, preprocess_cv2, resize_depth
from seeded_weights import SEED, fingerprint, seeded_state_dict

TOLERANCE = 1e-5  # relative L2

MANIFEST: dict[str, Any] = json.loads(data_file("golden", "cases.json").read_text())


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return seeded_state_dict()


def test_seeded_weights_match_the_fingerprint(state: dict[str, torch.Tensor]) -> None:
    assert MANIFEST["seed"] == SEED and MANIFEST["encoder"] == "vits"
    expected = json.loads(data_file("golden", "weights_fingerprint.json").read_text())
    ours = fingerprint({key: value.numpy() for key, value in state.items()})
    assert len(state) == 239
    assert all(value.dtype == torch.float32 for value in state.values())
    for key, value in expected.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-9, err_msg=key)


@pytest.fixture(scope="module")
def models(state: dict[str, torch.Tensor]) -> dict[str, DepthAnythingV2]:
    built = {
        "relative": build_model("vits"),
        "metric": build_model("vits", metric=True, max_depth=20.0),
    }
    for model in built.values():
        model.load_state_dict(state, strict=True)
        model.eval()
    return built


def test_every_case_is_covered() -> None:
    cases = {(c["image"], c["model"], c["input_size"]) for c in MANIFEST["cases"]}
    assert len(cases) == len(MANIFEST["cases"]) == 8
    assert {c["model"] for c in MANIFEST["cases"]} == {"relative", "metric"}


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=lambda case: case["output"].removesuffix(".npy"))
def test_matches_official_pipeline(models: dict[str, DepthAnythingV2], case: dict[str, Any]) -> None:
    image = cv2.imread(str(data_file("golden", case["image"])), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {case['image']}"
    if case["model"] == "metric":
        assert case["max_depth"] == models["metric"].max_depth
    x = preprocess_cv2(image, input_size=case["input_size"])
    with torch.inference_mode():
        depth = resize_depth(models[case["model"]](x), tuple(case["shape"]))[0].numpy()
    reference = np.load(data_file("golden", case["output"]))
    assert depth.shape == reference.shape == tuple(case["shape"])
    error = np.linalg.norm(depth - reference) / np.linalg.norm(reference)
    assert error <= TOLERANCE, f"relative L2 {error:.2e} > {TOLERANCE:.0e}"
