"""A request admitted by this worker (``Task``), from the broker's REQUEST to its reply.

The same request is a ``Request`` at the client, a ``RequestHeader`` on the
wire and a ``Job`` at the broker; here it is a task: what this worker has
taken on and owes exactly one answer.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from zdepth import protocol
from zdepth.errors import BadRequest, UnknownModel
from zdepth.models import DEFAULT_INPUT_SIZE
from zdepth.protocol import codec, compression

__all__ = ["Task", "parse_request"]


@dataclass(eq=False)
class Task:
    """A request admitted by this worker, on its way from the I/O loop through the compute threads and back.

    ``image`` is the image frame's payload (encoded bytes or a raw array
    view); ``decoded`` its HxWx3 BGR uint8 pixels, on their way from the
    decode pool. ``link`` is the broker connection it came on, where its
    reply goes; ``generation`` is that link's generation then: a task from an
    older connection (the link dropped or reconnected since) is abandoned.
    """

    rid: Any
    request_id: str | None
    op: str
    model: str
    params: codec.DepthParams
    image: Any
    received: float  # time.monotonic()
    deadline: float | None
    generation: int
    decoded: Future[np.ndarray] | None = None
    done: bool = False
    status: str | None = None  # the reply's status ("ok" or an error code) once there is one; None: abandoned
    held_bytes: int = 0  # counted against WorkerConfig.max_held_bytes while the task is held
    link: Any = None  # the BrokerLink it came on

    @property
    def batch_key(self) -> Hashable:
        """Tasks share a forward pass only with the same model and network input size."""
        return (self.model, self.params.input_size or DEFAULT_INPUT_SIZE)


def parse_request(
    header: dict[str, Any], body: list[zmq.Frame], *, models: tuple[str, ...], now: float, generation: int, max_image_bytes: int
) -> Task:
    """A Task from a broker REQUEST; raises a ServiceError that fails only this request."""
    op = header.get("op")
    if op not in protocol.MODEL_OPS:
        raise BadRequest(f"op {op!r} is not a model op; workers serve {sorted(protocol.MODEL_OPS)}")
    model = header.get("model")
    if model is None:  # the broker normally picks one; take the first that fits
        model = next((m for m in models if protocol.op_accepts_model(op, m)), None)
    if model not in models:
        raise UnknownModel(f"this worker serves {list(models)}, not {model!r}", details={"served": list(models)})
    if not protocol.op_accepts_model(op, model):
        kind = "metric (such as 'vits-hypersim')" if op != protocol.OP_RELATIVE else "relative (such as 'vits')"
        raise BadRequest(f"op {op!r} needs a {kind} model; {model!r} is not one")
    if len(body) != 2:
        raise BadRequest(f"a {op} request has two body frames (params, image), got {len(body)}")
    params = codec.parse_params(op, body[0].buffer)
    if params.depth_codec == compression.ZSTD:  # refused now, not after the forward pass
        missing = compression.zstd_missing()
        if missing:
            raise BadRequest(missing)
    image = codec.decode_image_frame(params.image, body[1].buffer, max_bytes=max_image_bytes)
    timeout_ms = header.get("timeout_ms")
    has_timeout = isinstance(timeout_ms, (int, float)) and not isinstance(timeout_ms, bool) and math.isfinite(timeout_ms)
    request_id = header.get("id")
    return Task(
        rid=header.get("rid"),
        request_id=request_id if isinstance(request_id, str) else None,
        op=op,
        model=model,
        params=params,
        image=image,
        received=now,
        deadline=now + timeout_ms / 1000 if has_timeout else None,
        generation=generation,
    )
