"""End-to-end agreement with the official pipeline's outputs (shared/golden).

The references were produced by the official code (cv2 preprocessing, fp32 on
the CPU, bilinear resize back) from the same fp16 checkpoint, so our fp32 CPU
pipeline must match to float rounding. Every case has a non-square network
input (518x686, 364x602, ...), which pins the DINOv2 positional-embedding
resize rule: a size-based resize is off by about 2e-3 here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from depth_anything_v2 import (
    DepthAnythingV2,
    build_model,
    load_checkpoint,
    preprocess_cv2,
    resize_depth,
)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
TOLERANCE = 1e-5  # relative L2

if not (GOLDEN / "cases.json").is_file():
    pytest.skip(
        f"golden vectors not found at {GOLDEN} (shared/ sits beside the clone)",
        allow_module_level=True,
    )

MANIFEST: dict[str, Any] = json.loads((GOLDEN / "cases.json").read_text())


@pytest.fixture(scope="module")
def models() -> dict[str, DepthAnythingV2]:
    built = {
        "relative": build_model("vits"),
        "metric": build_model("vits", metric=True, max_depth=20.0),
    }
    for model in built.values():
        load_checkpoint(model, GOLDEN / MANIFEST["checkpoint"])
        model.eval()
    return built


@pytest.mark.parametrize(
    "case", MANIFEST["cases"], ids=lambda case: case["output"].removesuffix(".npy")
)
def test_matches_official_pipeline(
    models: dict[str, DepthAnythingV2], case: dict[str, Any]
) -> None:
    image = cv2.imread(str(GOLDEN / case["image"]), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {case['image']}"
    assert case.get("max_depth", 20.0) == models["metric"].max_depth
    x = preprocess_cv2(image, input_size=case["input_size"])
    with torch.inference_mode():
        depth = resize_depth(models[case["model"]](x), tuple(case["shape"]))[0].numpy()
    reference = np.load(GOLDEN / case["output"])
    assert depth.shape == reference.shape
    error = np.linalg.norm(depth - reference) / np.linalg.norm(reference)
    assert error <= TOLERANCE, f"relative L2 {error:.2e} > {TOLERANCE:.0e}"
