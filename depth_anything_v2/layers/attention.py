"""Multi-head self-attention with DINOv2's fused ``qkv`` projection."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Self-attention over tokens ``[B, N, C]``.

    The softmax runs through ``F.scaled_dot_product_attention`` so PyTorch can
    choose flash or memory-efficient kernels; the result equals
    ``softmax(q k^T / sqrt(d)) v`` up to float rounding. Parameter names
    (``qkv``, ``proj``) follow the official checkpoints.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))
