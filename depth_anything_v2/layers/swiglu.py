"""The gated feed-forward network of the ViT-g blocks (DINOv2's "swiglufused")."""

from __future__ import annotations

from torch import Tensor, nn


def swiglu_hidden_features(hidden_features: int) -> int:
    """Shrink an MLP width to 2/3, rounded up to a multiple of 8.

    This keeps the gated FFN's parameter count close to the plain MLP it
    replaces; ViT-g's 6144 becomes 4096. The official checkpoints depend on it.
    """
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """``w3(act(a) * b)`` where ``a, b`` are the two halves of ``w12(x)``.

    ``hidden_features`` is the nominal MLP width (``dim * mlp_ratio``); the
    real width comes from :func:`swiglu_hidden_features`. Keys ``w12`` / ``w3``
    follow the official checkpoints.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        act_layer: type[nn.Module] = nn.SiLU,
    ):
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden)
        self.act = act_layer()
        self.w3 = nn.Linear(hidden, in_features)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.act(gate) * value)
