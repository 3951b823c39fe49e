"""Each admitted image turned into pixels off the I/O loop, while the image before it is in a batch.

A small pool decodes with cv2 (which releases the GIL); a JPEG that the
engine decodes on its device (``Engine.decodes_jpeg``) stays encoded until it
is prepared.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from zdepth.errors import BadRequest
from zdepth.metrics import WorkerMetrics
from zdepth.protocol import images as imageio
from zdepth.worker.engine import Engine

__all__ = ["DECODE_THREADS", "Decoder"]

DECODE_THREADS = min(4, os.cpu_count() or 1)


class Decoder:
    """The decode pool; ``decode`` is called by the I/O loop as each request is admitted."""

    def __init__(self, engine: Engine, *, max_pixels: int, metrics: WorkerMetrics | None) -> None:
        self._engine = engine
        self._max_pixels = max_pixels
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="zdepth-decode")

    def decode(self, image: Any) -> Future[Any]:
        """The image's pixels from the decode pool, or, for a JPEG the engine decodes on the GPU, the JPEG itself."""
        if self._engine.decodes_jpeg and not isinstance(image, np.ndarray):
            done: Future[Any] = Future()
            try:
                jpeg = imageio.device_decodable_jpeg(image, max_pixels=self._max_pixels)
            except BadRequest as exc:
                done.set_exception(exc)
                return done
            if jpeg is not None:
                done.set_result(jpeg)
                self._count("device")
                return done
        self._count("raw" if isinstance(image, np.ndarray) else "cpu")
        return self._pool.submit(imageio.decode_image, image, max_pixels=self._max_pixels)

    def _count(self, where: str) -> None:
        if self._metrics is not None:
            self._metrics.decoded(where)

    def shutdown(self) -> None:
        """Stop at once: decodes not started are cancelled (their requests are being abandoned)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
