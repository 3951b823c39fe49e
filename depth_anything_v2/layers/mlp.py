"""The two-layer feed-forward network of the ViT-S/B/L blocks."""

from __future__ import annotations

from torch import Tensor, nn


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; DINOv2 uses exact (erf) GELU, PyTorch's default."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
