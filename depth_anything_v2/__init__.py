"""Depth Anything V2 in plain PyTorch: tensors in, tensors out.

Loads the official checkpoints unchanged. Licences differ by size: the small
model (vits) is Apache-2.0; base, large and giant are CC-BY-NC-4.0.

    model = build_model("vits")
    load_checkpoint(model, "depth_anything_v2_vits.pth")
    depth = model(preprocess_cv2(cv2.imread("photo.jpg")))
"""

from .checkpoint import CheckpointError, guess_encoder, load_checkpoint
from .configs import CONFIGS, ENCODERS, EncoderConfig, get_config
from .dpt import DepthAnythingV2, build_model
from .transforms import (
    network_input_size,
    preprocess_cv2,
    preprocess_tensor,
    resize_depth,
)

__all__ = [
    "CONFIGS",
    "ENCODERS",
    "CheckpointError",
    "DepthAnythingV2",
    "EncoderConfig",
    "build_model",
    "get_config",
    "guess_encoder",
    "load_checkpoint",
    "network_input_size",
    "preprocess_cv2",
    "preprocess_tensor",
    "resize_depth",
]
