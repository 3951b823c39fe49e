"""What the engine's three steps hand each other: ``Prepared`` images (prepare -> run) and
``Pending`` batches (run -> collect), and the queued copy to the host that ``collect`` waits for.

Apart from ``Engine`` so that the contract between the steps reads on one page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Pending", "Prepared", "to_host"]


@dataclass(eq=False)
class Prepared:
    """One image ready for ``Engine.run``: its network input on the engine's device, and its own size."""

    tensor: torch.Tensor  # 1 x 3 x h x w, normalised
    shape: tuple[int, int]  # the image's (H, W): the depth map comes back at this size
    ready: torch.cuda.Event | None = None  # on CUDA: recorded on the upload stream once ``tensor`` is written

    @property
    def size(self) -> tuple[int, int]:
        """The network input's (h, w): images of one size share a forward pass."""
        return tuple(self.tensor.shape[2:])


@dataclass(eq=False)
class Pending:
    """A batch that ``Engine.run`` started: depth maps on the host, or on their way there, with
    each map's (min, max) ignoring NaN, taken on the device from the float32 values."""

    depths: list[torch.Tensor]  # per image, H x W on the host (pinned on CUDA): float32, or float16 where asked
    lows: list[torch.Tensor]  # per image, a 0-d float32 tensor on the host (inf where all of the map is NaN)
    highs: list[torch.Tensor]  # the same for the maximum (-inf where all of it is NaN)
    done: torch.cuda.Event | None = None  # on CUDA: recorded after the last copy to the host

    def ranges(self) -> list[tuple[float, float]]:
        """(min, max) of each map, NaN for one that is all NaN; read after ``Engine.collect``."""
        out = []
        for low, high in zip(self.lows, self.highs):
            low, high = float(low), float(high)
            out.append((low, high) if low <= high else (math.nan, math.nan))
        return out


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a device tensor, queued on the current stream (``Engine.collect`` waits)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
