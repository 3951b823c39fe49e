"""What the worker may call and read on an engine: the contract that ``zdepth.engine.Engine``,
a custom engine and a test double all meet, so that the worker never probes for optional parts.

Two levels. Every engine (``Engine``) loads models, runs whole batches with
``infer`` and says how it wants to be driven. One whose ``staged`` is true
(``StagedEngine``, as ``zdepth.engine.Engine``) also offers the three steps
that the worker's pipeline runs on three threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["ENGINE_MEMBERS", "STAGED_MEMBERS", "Engine", "Pending", "StagedEngine", "check_engine"]


class Pending(Protocol):
    """A batch that ``StagedEngine.run`` started."""

    def ranges(self) -> list[tuple[float, float]]:
        """Each depth map's (min, max), taken on the device; read after ``collect``."""
        ...


class Engine(Protocol):
    """Every engine the worker serves with."""

    device: Any  # where it runs ("cpu", "cuda:0" or a torch.device), for READY and the metrics; None: the config's
    precision: str | None  # for READY; None: the config's
    cuda_graphs: bool  # warm up every padded batch size, so that no request waits for a graph capture
    decodes_jpeg: bool  # takes EncodedJpeg and decodes on its device; otherwise the worker's pool decodes with cv2
    staged: bool  # offers prepare, run and collect (StagedEngine); otherwise infer runs each batch whole

    def load(self, model_id: str) -> object:
        """Load ``model_id`` once, before READY; raises WeightsNotFound, UnknownModel or ValueError."""
        ...

    def infer(self, images: Sequence[Any], model_id: str, *, input_size: int = ..., max_depth: Any = None) -> Sequence[np.ndarray]:
        """One float32 HxW depth map per image (HxWx3 uint8 BGR, or EncodedJpeg where ``decodes_jpeg``)."""
        ...


class StagedEngine(Engine, Protocol):
    """An engine whose batches go through in three steps, on the pipeline's three threads."""

    def prepare(self, image: Any, input_size: int) -> Any:
        """One image, decoded, uploaded and normalised (prepare thread)."""
        ...

    def run(self, prepared: Sequence[Any], model_id: str, *, max_depth: Any = None, float16: Sequence[bool] | None = None) -> Pending:
        """Start the forward pass over prepared images (compute thread, the only one that runs it)."""
        ...

    def collect(self, pending: Any) -> list[np.ndarray]:
        """The depth maps of a ``run``, once they are on the host (reply thread)."""
        ...


ENGINE_MEMBERS = ("device", "precision", "cuda_graphs", "decodes_jpeg", "staged", "load", "infer")
STAGED_MEMBERS = ("prepare", "run", "collect")


def check_engine(engine: Engine) -> None:
    """TypeError naming what an injected engine lacks: said when the worker is made, not later on a thread."""
    missing = [name for name in ENGINE_MEMBERS if not hasattr(engine, name)]
    if not missing and engine.staged:
        missing = [name for name in STAGED_MEMBERS if not callable(getattr(engine, name, None))]
    if missing:
        raise TypeError(
            f"engine {type(engine).__name__} lacks {', '.join(missing)}: a worker's engine meets zdepth.worker.engine.Engine "
            "(and StagedEngine when its staged is true)"
        )
