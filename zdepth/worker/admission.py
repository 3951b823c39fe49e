"""Limits checked before this worker accepts a request, from what the image's header tells:
so that a request refused anyway never costs a decode, and everything accepted can be answered.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zdepth import protocol
from zdepth.config import WorkerConfig
from zdepth.errors import BadRequest, Overloaded
from zdepth.models import DEFAULT_INPUT_SIZE, MAX_INPUT_SIZE
from zdepth.protocol import codec
from zdepth.protocol import images as imageio
from zdepth.worker.task import Task

__all__ = ["MAX_NETWORK_PIXELS", "admit", "check_held", "check_network_size", "check_reply_size", "held_bytes", "max_pixels"]

MAX_NETWORK_PIXELS = 4 * MAX_INPUT_SIZE**2  # the largest input size at 4:1; beyond it a request is refused


def max_pixels(config: WorkerConfig) -> int:
    """The most pixels an image may have: ``config.max_pixels``, by default the most whose float32
    depth map fits one reply message (4096 x 4096 at 64 MiB), so that every image accepted can be
    answered; never more than ``imageio.DEFAULT_MAX_PIXELS``."""
    if config.max_pixels is not None:
        return config.max_pixels
    return min(config.max_message_bytes // np.dtype(np.float32).itemsize, imageio.DEFAULT_MAX_PIXELS)


def held_bytes(image: Any, info: imageio.ImageInfo) -> int:
    """What holding a request's image may cost at its peak: the frame as received, plus what
    decoding it allocates at once (read from its header by ``imageio.inspect_image``: a 16-bit PNG
    costs 12 bytes a pixel, an 8-bit JPEG 6)."""
    return memoryview(image).nbytes + info.decode_bytes


def check_reply_size(task: Task, height: int, width: int, limit: int) -> None:
    """BadRequest when a reply frame would exceed the message limit: the broker would drop the
    connection of a worker that sent it (and every request that worker held would be re-queued)."""
    frames = {"depth": height * width * np.dtype(codec.DEPTH_DTYPES[task.params.depth_dtype]).itemsize}
    if task.op == protocol.OP_POINTCLOUD:
        frames["points"] = height * width * 3 * 4
    name, size = max(frames.items(), key=lambda item: item[1])
    if size > limit:
        hint = "compute the point cloud on the client (on_server=False)" if name == "points" else "use depth_dtype='float16'"
        raise BadRequest(
            f"the reply's {name} array for a {width}x{height} image would be {size} bytes, above the message limit of {limit}; "
            f"send a smaller image or {hint}"
        )


def check_network_size(task: Task, height: int, width: int) -> None:
    """BadRequest for an image so elongated that the network input would be absurd.

    The short side is scaled to ``input_size`` and the long side follows, so a 2x600 image at 518
    becomes a 518x155400 input: gigabytes and hours from a few bytes. Refused beyond the pixels
    of the largest input size at 4:1 (``4 * MAX_INPUT_SIZE**2``).
    """
    from depth_anything_v2.transforms import network_input_size  # imports torch: only once a batch runs

    input_size = task.params.input_size or DEFAULT_INPUT_SIZE
    net_height, net_width = network_input_size(height, width, input_size)
    if net_height * net_width > MAX_NETWORK_PIXELS:
        raise BadRequest(
            f"a {width}x{height} image at input_size {input_size} would be a {net_width}x{net_height} network input, "
            f"above the limit of {MAX_NETWORK_PIXELS} pixels; crop or pad such an elongated image, or lower input_size"
        )


def admit(task: Task, *, max_pixels: int, max_message_bytes: int) -> int:
    """What holding ``task`` will cost (``held_bytes``), once its image's header passed every limit;
    raises the ServiceError that refuses it otherwise."""
    info = imageio.inspect_image(task.image, max_pixels=max_pixels)
    check_reply_size(task, info.height, info.width, max_message_bytes)
    check_network_size(task, info.height, info.width)
    return held_bytes(task.image, info)


def check_held(held: int, outstanding: int, need: int, limit: int) -> None:
    """Overloaded when holding ``need`` more bytes would pass ``limit``; a worker holding nothing takes any one image."""
    if outstanding and held + need > limit:
        raise Overloaded(
            f"this worker holds {held} bytes of images and this one needs {need} "
            f"(limit {limit}); retry in a moment, send smaller images, or add workers"
        )
