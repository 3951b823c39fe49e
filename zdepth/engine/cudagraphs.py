"""CUDA graphs for the forward pass: one replay instead of hundreds of kernel launches.

At batch 1 a ViT forward pass is bound by launches, not by arithmetic (vits at
518x686: about 4 ms launched one by one against 0.2 ms of compute on an
H200). A captured graph replays the whole pass with one launch.

A graph is fixed to its input shape, so batches are padded up to a power of
two (1, 2, 4, 8, ...): a handful of graphs per network input size covers every
batch the worker forms. Samples never mix in this model (no batch statistics
in eval mode), so the padding rows change nothing but the work done. The
graphs of one model share a memory pool: their outputs are read before the
next replay, so one graph's activations may reuse another's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from zdepth.engine.batching import padded_batch

__all__ = ["GraphedForward", "padded_batch"]

logger = logging.getLogger(__name__)

MAX_GRAPHS = 32  # per model; past it, new shapes run eagerly
WARMUP_CALLS = 2  # eager calls on a side stream before capture: cuBLAS/cuDNN workspaces, lazy inits


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # static input: copy a batch in, then replay
    scale: torch.Tensor | None  # static per-sample max_depth (metric models)
    out: torch.Tensor  # static output, overwritten by the next replay


class GraphedForward:
    """Calls ``model(x, scale)`` through a CUDA graph captured per (padded batch, shape, dtype).

    The returned tensor is the graph's static output (a view of its first
    ``len(x)`` rows): read or copy it before the next call. One instance is
    used from one thread, the engine's, inside ``torch.inference_mode``. A
    shape whose capture fails (out of memory, say) runs eagerly from then on.
    """

    def __init__(self, model: torch.nn.Module, *, max_graphs: int = MAX_GRAPHS) -> None:
        self.model = model
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Graph] = {}
        self._eager: set[tuple] = set()  # shapes whose capture failed
        self._pool = None  # one memory pool for all of this model's graphs
        self._warned = False

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def __call__(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cuda":
            return self.model(x, scale)
        count = x.shape[0]
        key = (padded_batch(count), *x.shape[1:], x.dtype, scale is not None)
        entry = self._graphs.get(key)
        if entry is None:
            if key in self._eager or not self._room(key):
                return self.model(x, scale)
            entry = self._capture(key, x)
            if entry is None:
                return self.model(x, scale)
        with torch.cuda.device(x.device):  # replay() launches on the current device's stream
            entry.x[:count].copy_(x)
            if entry.scale is not None:
                entry.scale[:count].copy_(scale)
            entry.graph.replay()
        return entry.out[:count]

    def _room(self, key: tuple) -> bool:
        if len(self._graphs) < self.max_graphs:
            return True
        if not self._warned:
            self._warned = True
            logger.warning("%d CUDA graphs captured; shape %s and later new ones run without a graph", self.max_graphs, key[:-2])
        return False

    def _capture(self, key: tuple, like: torch.Tensor) -> _Graph | None:
        padded, device = key[0], like.device
        try:
            with torch.cuda.device(device):  # streams, pool and capture on the model's GPU, not the current one
                x = torch.zeros((padded, *like.shape[1:]), dtype=like.dtype, device=device)
                scale = torch.ones(padded, dtype=torch.float32, device=device) if key[-1] else None
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                current = torch.cuda.current_stream(device)
                side = torch.cuda.Stream(device)
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_CALLS):
                        self.model(x, scale)
                current.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=side):
                    out = self.model(x, scale)
                current.wait_stream(side)
        except Exception as exc:  # out of memory, an op that cannot be captured: run this shape eagerly
            self._eager.add(key)
            logger.warning("capturing a CUDA graph for batch %d at %s failed (%s: %s); that shape runs without one", padded, tuple(like.shape[2:]), type(exc).__name__, exc)
            return None
        logger.info("captured a CUDA graph for batch %d at %s (%s)", padded, tuple(like.shape[2:]), like.dtype)
        self._graphs[key] = entry = _Graph(graph, x, scale, out)
        return entry
