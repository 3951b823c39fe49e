"""The only torch code: the inference engine (``inference``), CUDA graphs, batch sizes and checkpoints.

``Engine`` is loaded on first use (PEP 562), so that the torch-free parts, ``weights``
(finding and fetching checkpoints) and ``batching``, can be imported where torch is not.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zdepth.engine.inference import Engine, Pending

__all__ = ["Engine", "Pending"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from zdepth.engine import inference

        return getattr(inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
