"""The only torch code on the serving side: device, precision, batched forward.

``Engine.infer`` takes decoded BGR images of any sizes and returns one float32
depth map per image at that image's own size, in input order. Images whose
network input sizes agree run in one forward pass.

Two preprocessing paths, chosen by device:

- CPU (fp32): ``preprocess_cv2`` per image, exactly the official pipeline, so
  outputs reproduce the official ``infer_image`` (shared/golden) to ~1e-5.
- CUDA (fp16 by default): arrays go up once through pinned memory; with
  ``gpu_decode``, JPEGs (``EncodedJpeg``) are decoded on the GPU by nvjpeg,
  all of a batch in one call.
  Colour order, resize and normalisation run on the GPU (``preprocess_tensor``),
  so do the forward (optionally replayed as a CUDA graph, ``cuda_graphs=True``)
  and the resize back; one host copy comes back per batch of equally sized
  images. torch's bicubic differs from cv2's by float rounding only.

Besides ``infer``, a batch can go through in three steps that a server runs on
three threads, so that host work overlaps the device's: ``prepare`` one image
(decode, upload, resize and normalise; on CUDA on an upload stream of its own),
``run`` a batch of prepared images (the forward pass and the resize back, with
the copy to the host started; on CUDA it returns before the device is done),
and ``collect`` its depth maps (waits for the copy). ``prepare`` may run on one
thread while ``run`` and ``collect`` run on two others; each step of one batch
on one thread at a time. ``torch.set_num_threads`` is the caller's business.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from depth_anything_v2 import build_model, load_checkpoint, network_input_size, preprocess_cv2, preprocess_tensor, resize_depth
from zdepth.engine.cudagraphs import GraphedForward
from zdepth.errors import BadRequest
from zdepth.models import DEFAULT_INPUT_SIZE, input_size_problem
from zdepth.protocol.images import EncodedJpeg
from zdepth.engine.weights import ModelSpec, find_checkpoint, get_spec

__all__ = ["Engine", "Pending", "Prepared", "PRECISIONS"]

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

DECODER_STRIKES = 8  # batches in a row on which the device decoder failed every JPEG cv2 could read: then it is switched off
MaxDepth = float | Sequence[float | None] | None
Image = np.ndarray | EncodedJpeg


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


class Engine:
    """Loads Depth Anything V2 models on one device and runs batched inference.

    ``precision``: "fp32", "fp16" or "bf16"; default fp16 on CUDA, fp32 elsewhere
    (half precision on the CPU is refused: slow, and not what the golden tests pin).
    ``weights_dir`` and ``download`` are passed to ``find_checkpoint``.
    ``compile=True`` wraps each model in ``torch.compile``; call ``warmup`` with
    the sizes you expect, since every new input shape compiles again.
    ``cuda_graphs=True`` (CUDA only) replays each forward pass as a CUDA graph,
    captured on the first batch of each padded size (see ``zdepth.cudagraphs``).
    ``gpu_decode=True`` (CUDA only) decodes ``EncodedJpeg`` inputs with nvjpeg
    where torchvision has it: 0.3-0.4 ms on the GPU instead of 2-3 ms of CPU per
    480x640 frame, but nvjpeg upsamples 4:2:0 chroma differently from cv2
    (libjpeg-turbo), and the depth moves by up to ~2e-2 relative L2 (measured
    on an H200), past the 1e-2 the fast path is held to. Off by default.
    """

    def __init__(
        self,
        *,
        device: str | torch.device = "cpu",
        precision: str | None = None,
        weights_dir: str | os.PathLike[str] | None = None,
        download: bool = False,
        compile: bool = False,
        cuda_graphs: bool = False,
        gpu_decode: bool = False,
    ) -> None:
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"invalid device {device!r}: {exc}") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
        if precision is None:
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.device.type == "cpu" and precision != "fp32":
            raise ValueError(f"precision {precision!r} is not supported on the CPU; use precision='fp32'")
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device!r}; leave cuda_graphs off")
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.weights_dir = weights_dir
        self.download = download
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        # The official cv2 pipeline on the CPU; the batched torch pipeline elsewhere.
        self._cv2_preprocess = self.device.type == "cpu"
        self._decode_jpeg = _torchvision_jpeg_decoder() if gpu_decode and self.device.type == "cuda" else None
        self._decoder_strikes = 0
        self._models: dict[str, torch.nn.Module] = {}
        self._forwards: dict[str, torch.nn.Module | GraphedForward] = {}
        self._upload_stream: torch.cuda.Stream | None = None  # created on first use, on this engine's device

    @property
    def decodes_jpeg(self) -> bool:
        """Whether ``infer`` decodes ``EncodedJpeg`` inputs on the device; otherwise cv2 decodes them first."""
        return self._decode_jpeg is not None

    @property
    def loaded(self) -> tuple[str, ...]:
        """Ids of the models held on the device, in load order."""
        return tuple(self._models)

    def load(self, model_id: str) -> ModelSpec:
        """Build, strictly load and place ``model_id`` once; later calls return at once.

        Raises UnknownModel, WeightsNotFound, or CheckpointError (a ValueError)
        for a file that does not fit.
        """
        spec = get_spec(model_id)
        if spec.id in self._models:
            return spec
        path = find_checkpoint(spec.id, self.weights_dir, download=self.download)
        start = time.perf_counter()
        if spec.metric:
            model = build_model(spec.encoder, metric=True, max_depth=spec.default_max_depth)
        else:
            model = build_model(spec.encoder)
        load_checkpoint(model, path)
        model = model.eval().requires_grad_(False).to(self.device, self.dtype)
        if self.compile:
            model = torch.compile(model)
        self._models[spec.id] = model
        self._forwards[spec.id] = GraphedForward(model) if self.cuda_graphs else model
        logger.info(
            "loaded %s from %s on %s (%s) in %.1f s; license %s",
            spec.id, path, self.device, self.precision, time.perf_counter() - start, spec.license,
        )  # fmt: skip
        return spec

    def model(self, model_id: str) -> torch.nn.Module:
        """The loaded (possibly compiled) module for ``model_id``, loading it if needed."""
        return self._models[self.load(model_id).id]

    def infer(
        self,
        images: Sequence[Image],
        model_id: str,
        *,
        input_size: int = DEFAULT_INPUT_SIZE,
        max_depth: MaxDepth = None,
    ) -> list[np.ndarray]:
        """Depth for each HxWx3 uint8 BGR image (or ``EncodedJpeg``), as float32 HxW at the image's own size.

        ``input_size``: the network's short side, a multiple of 14 in
        [14, 2058]. ``max_depth`` (metric models only): one value for all
        images or one per image, None meaning the model's default (20 m
        hypersim, 80 m vkitti). Relative models return disparity-like values
        (larger is nearer). Bad arguments raise BadRequest.
        """
        spec = get_spec(model_id)
        _check_input_size(input_size)
        images = list(images)
        for index, image in enumerate(images):
            _check_image(index, image)
        scales = _max_depths(spec, max_depth, len(images))
        if not images:
            return []
        if not self.decodes_jpeg:
            images = [image.decode() if isinstance(image, EncodedJpeg) else image for image in images]
        self.load(spec.id)
        forward = self._forwards[spec.id]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(network_input_size(*image.shape[:2], input_size), []).append(index)
        results: dict[int, np.ndarray] = {}
        with torch.inference_mode(), self._on_device():
            for size, indices in groups.items():
                batch = [images[i] for i in indices]
                scale = None if scales is None else torch.tensor([scales[i] for i in indices], dtype=torch.float32)
                if self._cv2_preprocess:
                    prepared = [Prepared(preprocess_cv2(image, input_size), image.shape[:2]) for image in batch]
                    depths = [depth.numpy() for depth in self._run_group(forward, prepared, scale, ranges=False).depths]
                else:
                    depths = self._forward_tensor(forward, batch, size, scale)
                results.update(zip(indices, depths))
        return [results[i] for i in range(len(images))]

    def prepare(self, image: Image, input_size: int = DEFAULT_INPUT_SIZE) -> Prepared:
        """Step one for one image: decode (an EncodedJpeg), upload, resize and normalise it for ``run``.

        On the CPU this is the official cv2 preprocessing, so ``prepare`` +
        ``run`` + ``collect`` give exactly what ``infer`` gives. On CUDA the
        work is queued on an upload stream of the engine's own, which a
        forward pass on the compute stream does not wait for. Bad arguments
        raise BadRequest.
        """
        _check_input_size(input_size)
        _check_image(0, image)
        if isinstance(image, EncodedJpeg) and not self.decodes_jpeg:
            image = image.decode()
        shape = (image.shape[0], image.shape[1])
        size = network_input_size(*shape, input_size)
        with torch.inference_mode():
            if self._cv2_preprocess:
                return Prepared(preprocess_cv2(image, input_size), shape)
            if self.device.type != "cuda":
                return Prepared(self._preprocess_on_device(image, size), shape)
            with torch.cuda.device(self.device):
                if self._upload_stream is None:
                    self._upload_stream = torch.cuda.Stream(self.device)
                with torch.cuda.stream(self._upload_stream):
                    tensor = self._preprocess_on_device(image, size)
                    ready = torch.cuda.Event()
                    ready.record(self._upload_stream)
            return Prepared(tensor, shape, ready)

    def run(
        self, prepared: Sequence[Prepared], model_id: str, *, max_depth: MaxDepth = None, float16: Sequence[bool] | None = None
    ) -> Pending:
        """Step two: the forward pass over prepared images (grouped by network input size) and the
        resize back to each image's size, with the copies to the host queued behind them.

        On CUDA this returns once the work is queued; ``collect`` waits for it.
        ``max_depth`` as for ``infer``. ``float16``: per image, whether its map
        comes back as float16, cast on the device (half the bytes to copy);
        min and max are taken before the cast either way.
        """
        spec = get_spec(model_id)
        prepared = list(prepared)
        scales = _max_depths(spec, max_depth, len(prepared))
        halves = [False] * len(prepared) if float16 is None else [bool(h) for h in float16]
        if len(halves) != len(prepared):
            raise BadRequest(f"got {len(halves)} float16 flags for {len(prepared)} images")
        self.load(spec.id)
        forward = self._forwards[spec.id]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(prepared):
            groups.setdefault(item.size, []).append(index)
        out = Pending([None] * len(prepared), [None] * len(prepared), [None] * len(prepared))  # type: ignore[list-item]
        with torch.inference_mode(), self._on_device():
            for indices in groups.values():
                scale = None if scales is None else torch.tensor([scales[i] for i in indices], dtype=torch.float32)
                part = self._run_group(forward, [prepared[i] for i in indices], scale, [halves[i] for i in indices])
                for k, i in enumerate(indices):
                    out.depths[i], out.lows[i], out.highs[i] = part.depths[k], part.lows[k], part.highs[k]
            if self.device.type == "cuda":
                out.done = torch.cuda.Event()
                out.done.record()
        return out

    def collect(self, pending: Pending) -> list[np.ndarray]:
        """Step three: the depth maps of a ``run``, as float32 H x W arrays, once they are on the host."""
        if pending.done is not None:
            pending.done.synchronize()  # releases the GIL while the device finishes
        return [depth.numpy() for depth in pending.depths]

    def _on_device(self):
        """The current CUDA device is per thread and is cuda:0 unless set: make it this engine's."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _preprocess_on_device(self, image: Image, size: tuple[int, int]) -> torch.Tensor:
        """One image as a normalised 1 x 3 x h x w network input in the engine's dtype, on its device
        (the current stream): decoded there (EncodedJpeg) or uploaded through pinned memory."""
        frame = self._decode_on_device([image])[0]
        if isinstance(frame, np.ndarray):
            pinned = self.device.type == "cuda"
            host = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=pinned)
            host.numpy()[...] = frame
            chw = host.to(self.device, non_blocking=pinned).permute(2, 0, 1).flip(0)  # HWC BGR -> CHW RGB
        else:
            chw = frame  # CHW RGB on the device
        return preprocess_tensor(chw.unsqueeze(0), size).to(self.dtype)

    def _run_group(
        self, forward, prepared: list[Prepared], scale: torch.Tensor | None, halves: list[bool] | None = None, *, ranges: bool = True
    ) -> Pending:
        """The forward pass over prepared images of one network input size, the resize back, each
        map's min and max (unless ``ranges`` is off), and (on CUDA) the copies to the host, queued behind them."""
        cuda = self.device.type == "cuda"
        halves = halves or [False] * len(prepared)
        if cuda:
            stream = torch.cuda.current_stream(self.device)
            for item in prepared:
                if item.ready is not None:
                    stream.wait_event(item.ready)
                    item.tensor.record_stream(stream)  # made on the upload stream, read on this one
        x = prepared[0].tensor if len(prepared) == 1 else torch.cat([item.tensor for item in prepared])
        if scale is not None:
            scale = scale.to(self.device, non_blocking=cuda)
        depth = forward(x.to(self.device, self.dtype), scale).float()
        # Equally sized images (and wanted dtypes) share one resize back and one copy to the host.
        by_shape: dict[tuple[tuple[int, int], bool], list[int]] = {}
        for j, item in enumerate(prepared):
            by_shape.setdefault((item.shape, halves[j]), []).append(j)
        out = Pending([None] * len(prepared), [None] * len(prepared), [None] * len(prepared))  # type: ignore[list-item]
        for (shape, half), members in by_shape.items():
            rows = depth[members[0] : members[0] + 1] if len(members) == 1 else depth[members]
            resized = resize_depth(rows, shape)
            bounds = None
            if ranges:
                nan = torch.isnan(resized)
                bounds = torch.stack([
                    torch.where(nan, math.inf, resized).amin(dim=(1, 2)),
                    torch.where(nan, -math.inf, resized).amax(dim=(1, 2)),
                ])  # fmt: skip
            if half:
                resized = resized.half()
            if cuda:
                resized = _to_host(resized)
                bounds = None if bounds is None else _to_host(bounds)
            for k, j in enumerate(members):
                out.depths[j] = resized[k]
                if bounds is not None:
                    out.lows[j], out.highs[j] = bounds[0, k], bounds[1, k]
        return out

    def warmup(self, model_id: str, sizes: Iterable[tuple[int, int]] = ((480, 640),), *, input_size: int = DEFAULT_INPUT_SIZE, batch_size: int = 1) -> float:
        """Load ``model_id`` and run ``batch_size`` black images of each (height, width).

        Moves first-call costs (cuDNN autotuning, torch.compile) out of the
        first request. Returns the seconds it took.
        """
        start = time.perf_counter()
        for height, width in sizes:
            self.infer([np.zeros((height, width, 3), np.uint8)] * batch_size, model_id, input_size=input_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        logger.info("warmed up %s in %.1f s", model_id, elapsed)
        return elapsed

    def _forward_tensor(
        self, forward: torch.nn.Module | GraphedForward, batch: list[Image], size: tuple[int, int], scale: torch.Tensor | None
    ) -> list[np.ndarray]:
        frames = self._decode_on_device(batch)
        # Equally sized images share one upload and one resize back.
        by_shape: dict[tuple[int, int], list[int]] = {}
        for j, image in enumerate(batch):
            by_shape.setdefault(image.shape[:2], []).append(j)
        pinned = self.device.type == "cuda"
        inputs, order = [], []
        for shape, members in by_shape.items():
            arrays = [j for j in members if isinstance(frames[j], np.ndarray)]
            decoded = [j for j in members if not isinstance(frames[j], np.ndarray)]
            parts = []
            if arrays:
                host = torch.empty((len(arrays), *shape, 3), dtype=torch.uint8, pin_memory=pinned)
                for k, j in enumerate(arrays):
                    host[k].numpy()[...] = frames[j]
                uploaded = host.to(self.device, non_blocking=pinned)
                parts.append(uploaded.permute(0, 3, 1, 2).flip(1))  # NHWC BGR -> NCHW RGB
            if decoded:
                parts.append(torch.stack([frames[j] for j in decoded]))  # already CHW RGB on the device
            inputs.append(preprocess_tensor(parts[0] if len(parts) == 1 else torch.cat(parts), size))
            members[:] = arrays + decoded  # the order they were stacked in, which the resize back follows
            order += members
        x = (inputs[0] if len(inputs) == 1 else torch.cat(inputs)).to(self.dtype)
        if scale is not None:
            scale = scale[order].to(self.device, non_blocking=pinned)
        depth = forward(x, scale).float()
        out: dict[int, np.ndarray] = {}
        start = 0
        for shape, members in by_shape.items():
            resized = resize_depth(depth[start : start + len(members)], shape).cpu().numpy()
            start += len(members)
            out.update(zip(members, resized))
        return [out[j] for j in range(len(batch))]

    def _decode_on_device(self, batch: list[Image]) -> list[np.ndarray | torch.Tensor]:
        """``batch`` with each EncodedJpeg decoded on the device as CHW RGB uint8, all in one call.

        A JPEG the device decoder refuses, or decodes to another size than its
        header declares, is decoded by cv2 instead (which also gives a corrupt
        file its proper BadRequest). If the decoder fails on every JPEG of
        ``DECODER_STRIKES`` batches in a row that cv2 could read, it is taken
        to be broken and switched off, with a warning.
        """
        jpegs = [j for j, image in enumerate(batch) if isinstance(image, EncodedJpeg)]
        frames: list[np.ndarray | torch.Tensor] = list(batch)  # type: ignore[arg-type]
        if not jpegs:
            return frames
        data = [torch.frombuffer(bytearray(batch[j].data), dtype=torch.uint8) for j in jpegs]
        try:
            decoded = self._decode_jpeg(data, self.device)
        except RuntimeError:  # nvjpeg returns nothing when one image fails: find which, one by one
            decoded = [_try_decode(self._decode_jpeg, item, self.device) for item in data]
        failed = 0
        for j, tensor in zip(jpegs, decoded):
            jpeg = batch[j]
            if tensor is not None and tuple(tensor.shape) == (3, jpeg.height, jpeg.width):
                frames[j] = tensor
            else:
                frames[j] = jpeg.decode()  # raises BadRequest for a file cv2 cannot read either
                failed += 1
        self._decoder_strikes = self._decoder_strikes + 1 if failed == len(jpegs) else 0
        if self._decoder_strikes >= DECODER_STRIKES:
            logger.warning("the device JPEG decoder failed on %d batches in a row that cv2 decoded; decoding with cv2 from now on", self._decoder_strikes)
            self._decode_jpeg = None
        return frames


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a device tensor, queued on the current stream (``Engine.collect`` waits)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _check_input_size(input_size: object) -> None:
    problem = input_size_problem(input_size)
    if problem:
        raise BadRequest(problem)


def _torchvision_jpeg_decoder():
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


def _try_decode(decode, data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode([data], device)[0]
    except RuntimeError:
        return None


def _check_image(index: int, image: object) -> None:
    if isinstance(image, EncodedJpeg):
        return
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise BadRequest(f"image {index}: expected an HxWx3 uint8 BGR array (see zdepth.imageio.decode_image), got {described}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise BadRequest(f"image {index} is empty, shape {image.shape}")


def _max_depths(spec: ModelSpec, max_depth: MaxDepth, count: int) -> list[float] | None:
    """One max_depth per image for a metric model, None for a relative one."""
    if isinstance(max_depth, (str, bytes)):
        raise BadRequest(f"max_depth must be a number or a list of numbers, got {max_depth!r}")
    single = max_depth is None or isinstance(max_depth, numbers.Real)
    values: list[object] = [max_depth] * count if single else list(max_depth)  # type: ignore[arg-type]
    if not spec.metric:
        if (single and max_depth is not None) or any(value is not None for value in values):
            raise BadRequest(
                f"model {spec.id!r} is relative and has no max_depth; "
                f"use a metric model (e.g. {spec.encoder}-hypersim) or leave max_depth out"
            )
        return None
    if len(values) != count:
        raise BadRequest(f"got {len(values)} max_depth values for {count} images; give one per image or a single one")
    scales = []
    for value in values:
        if value is None:
            value = spec.default_max_depth
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise BadRequest(f"max_depth must be a positive number of metres, got {value!r}")
        scales.append(float(value))
    return scales
