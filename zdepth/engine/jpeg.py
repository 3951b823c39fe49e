"""Decoding JPEGs on the engine's device (nvjpeg on CUDA, through torchvision), with cv2 as the fallback.

Apart from the forward pass because it has its own failure modes: the device
decoder refuses some files that cv2 reads, returns nothing for a whole batch
when one file fails, and may be broken altogether on a machine (then it is
switched off rather than retried on every batch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from zdepth.protocol.images import EncodedJpeg

__all__ = ["DECODER_STRIKES", "DeviceJpegDecoder", "torchvision_jpeg_decoder"]

logger = logging.getLogger("zdepth.engine.inference")  # the engine's log lines, wherever the code lives

DECODER_STRIKES = 8  # batches in a row on which the device decoder failed every JPEG cv2 could read: then it is switched off

DecodeFn = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def torchvision_jpeg_decoder() -> DecodeFn | None:
    """A function ``(list of uint8 CPU tensors, device) -> list of CHW RGB uint8`` on that device, or None.

    torchvision's ``decode_jpeg`` (nvjpeg on CUDA) is deprecated from 0.29 on in
    favour of TorchCodec; while it is there we use it, else cv2 decodes.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        logger.warning("torchvision has no decode_jpeg; JPEGs are decoded with cv2 on the CPU")
        return None

    def decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


class DeviceJpegDecoder:
    """Decodes the EncodedJpegs of a batch on one device, all in one call; cv2 takes over where it fails.

    ``on`` turns False for good once the decoder has failed on every JPEG of
    ``DECODER_STRIKES`` batches in a row that cv2 could read: it is taken to
    be broken, with a warning.
    """

    def __init__(self, decode: DecodeFn, device: torch.device) -> None:
        self._decode: DecodeFn | None = decode
        self.device = device
        self._strikes = 0

    @property
    def on(self) -> bool:
        return self._decode is not None

    def decode(self, batch: Sequence[np.ndarray | EncodedJpeg]) -> list[np.ndarray | torch.Tensor]:
        """``batch`` with each EncodedJpeg decoded on the device as CHW RGB uint8, all in one call.

        A JPEG the device decoder refuses, or decodes to another size than its
        header declares, is decoded by cv2 instead (which also gives a corrupt
        file its proper BadRequest).
        """
        jpegs = [j for j, image in enumerate(batch) if isinstance(image, EncodedJpeg)]
        frames: list[np.ndarray | torch.Tensor] = list(batch)  # type: ignore[arg-type]
        if not jpegs or self._decode is None:
            return frames
        data = [torch.frombuffer(bytearray(batch[j].data), dtype=torch.uint8) for j in jpegs]
        try:
            decoded = self._decode(data, self.device)
        except RuntimeError:  # nvjpeg returns nothing when one image fails: find which, one by one
            decoded = [_try_decode(self._decode, item, self.device) for item in data]
        failed = 0
        for j, tensor in zip(jpegs, decoded):
            jpeg = batch[j]
            if tensor is not None and tuple(tensor.shape) == (3, jpeg.height, jpeg.width):
                frames[j] = tensor
            else:
                frames[j] = jpeg.decode()  # raises BadRequest for a file cv2 cannot read either
                failed += 1
        self._strikes = self._strikes + 1 if failed == len(jpegs) else 0
        if self._strikes >= DECODER_STRIKES:
            logger.warning("the device JPEG decoder failed on %d batches in a row that cv2 decoded; decoding with cv2 from now on", self._strikes)
            self._decode = None
        return frames


def _try_decode(decode: DecodeFn, data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode([data], device)[0]
    except RuntimeError:
        return None
