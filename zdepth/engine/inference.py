"""The only torch code on the serving side: device, precision, batched forward.

``Engine.infer`` takes decoded BGR images of any sizes and returns one float32
depth map per image at that image's own size, in input order. Images whose
network input sizes agree run in one forward pass.

Two preprocessing paths, chosen by device unless ``preprocess`` says which:

- CPU (fp32), ``preprocess="cv2"``: ``preprocess_cv2`` per image, exactly the official pipeline, so
  outputs reproduce the official ``infer_image`` (shared/golden) to ~1e-5.
- CUDA (fp16 by default), ``preprocess="torch"``: arrays go up once through
  pinned memory; with ``jpeg_decoder="device"`` (``gpu_decode``), JPEGs
  (``EncodedJpeg``) are decoded on the GPU by nvjpeg, all of a batch in one
  call (``zdepth.engine.jpeg``).
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
import os
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from depth_anything_v2 import build_model, load_checkpoint, network_input_size, preprocess_cv2, preprocess_tensor, resize_depth
from zdepth.engine.arguments import MaxDepth, check_image, check_input_size, max_depths
from zdepth.engine.compile_cache import use_compile_cache
from zdepth.engine.cudagraphs import GraphedForward
from zdepth.engine.jpeg import DECODER_STRIKES, DeviceJpegDecoder, torchvision_jpeg_decoder
from zdepth.engine.steps import Pending, Prepared, to_host
from zdepth.engine.weights import ModelSpec, find_checkpoint, get_spec
from zdepth.errors import BadRequest
from zdepth.models import DEFAULT_INPUT_SIZE
from zdepth.protocol.images import EncodedJpeg

__all__ = ["Engine", "Pending", "Prepared", "PRECISIONS", "PREPROCESSING", "JPEG_DECODERS", "DECODER_STRIKES"]

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PREPROCESSING = ("cv2", "torch")  # the official per-image cv2 pipeline, or the batched torch one (on the device)
JPEG_DECODERS = ("cv2", "device")  # cv2 on the CPU before the engine, or torchvision's decode_jpeg on the engine's device

Image = np.ndarray | EncodedJpeg



def resolve_device(device: str | torch.device | None) -> str | torch.device:
    """The one rule for ``auto`` (or None): the first GPU when CUDA is available, else the CPU."""
    if device is None or device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device

class Engine:
    """Loads Depth Anything V2 models on one device and runs batched inference.

    ``device``: a torch device, or "auto" for the first GPU if there is one, else the CPU.
    ``precision``: "fp32", "fp16" or "bf16"; default fp16 on CUDA, fp32 elsewhere
    (half precision on the CPU is refused: slow, and not what the golden tests pin).
    ``weights_dir`` and ``download`` are passed to ``find_checkpoint``.
    ``compile=True`` wraps each model in ``torch.compile``; call ``warmup`` with
    the sizes you expect, since every new input shape compiles again. The
    compiled kernels are kept on disk (``zdepth.engine.compile_cache``), so a restart
    loads them instead of compiling again (vits at 140 on 2 CPU cores: ready in
    5 s instead of 40).
    ``cuda_graphs=True`` (CUDA only) replays each forward pass as a CUDA graph,
    captured on the first batch of each padded size (see ``zdepth.engine.cudagraphs``).
    ``gpu_decode=True`` (CUDA only) decodes ``EncodedJpeg`` inputs with nvjpeg
    where torchvision has it: 0.3-0.4 ms on the GPU instead of 2-3 ms of CPU per
    480x640 frame, but nvjpeg upsamples 4:2:0 chroma differently from cv2
    (libjpeg-turbo), and the depth moves by up to ~2e-2 relative L2 (measured
    on an H200), past the 1e-2 the fast path is held to. Off by default.

    ``preprocess`` ("cv2" or "torch") and ``jpeg_decoder`` ("cv2" or "device")
    make those choices explicit, on any device (the CUDA pipeline can run on
    the CPU, as tests do): by default "cv2" preprocessing on the CPU and
    "torch" elsewhere, and the "device" decoder only with ``gpu_decode`` on
    CUDA. Decoding on the device needs the torch preprocessing.
    """

    staged = True  # offers prepare, run and collect: a worker runs them on three threads

    def __init__(
        self,
        *,
        device: str | torch.device | None = "cpu",
        precision: str | None = None,
        weights_dir: str | os.PathLike[str] | None = None,
        download: bool = False,
        compile: bool = False,
        cuda_graphs: bool = False,
        gpu_decode: bool = False,
        preprocess: str | None = None,
        jpeg_decoder: str | None = None,
    ) -> None:
        device = resolve_device(device)
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
        if preprocess is None:  # the official cv2 pipeline on the CPU; the batched torch pipeline elsewhere
            preprocess = "cv2" if self.device.type == "cpu" else "torch"
        if preprocess not in PREPROCESSING:
            raise ValueError(f"unknown preprocess {preprocess!r}; choose one of {', '.join(PREPROCESSING)}")
        if jpeg_decoder is None:
            jpeg_decoder = "device" if gpu_decode and self.device.type == "cuda" else "cv2"
        if jpeg_decoder not in JPEG_DECODERS:
            raise ValueError(f"unknown jpeg_decoder {jpeg_decoder!r}; choose one of {', '.join(JPEG_DECODERS)}")
        if jpeg_decoder == "device" and preprocess == "cv2":
            raise ValueError("jpeg_decoder='device' needs preprocess='torch': cv2 preprocessing takes decoded arrays")
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.weights_dir = weights_dir
        self.download = download
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.preprocess = preprocess
        self.jpeg_decoder = jpeg_decoder
        self._cv2_preprocess = preprocess == "cv2"
        decode = torchvision_jpeg_decoder() if jpeg_decoder == "device" else None
        self._jpeg = DeviceJpegDecoder(decode, self.device) if decode is not None else None
        self._models: dict[str, torch.nn.Module] = {}
        self._forwards: dict[str, torch.nn.Module | GraphedForward] = {}
        self._upload_stream: torch.cuda.Stream | None = None  # created on first use, on this engine's device

    @property
    def decodes_jpeg(self) -> bool:
        """Whether ``infer`` decodes ``EncodedJpeg`` inputs on the device; otherwise cv2 decodes them first."""
        return self._jpeg is not None and self._jpeg.on

    @property
    def loaded(self) -> tuple[str, ...]:
        """Ids of the models held on the device, in load order."""
        return tuple(self._models)

    def captured_graphs(self, model_id: str) -> int:
        """How many CUDA graphs ``model_id``'s forward pass holds (0 without ``cuda_graphs``)."""
        forward = self._forwards.get(get_spec(model_id).id)
        return forward.captured if isinstance(forward, GraphedForward) else 0

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
            use_compile_cache()
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
        check_input_size(input_size)
        images = list(images)
        for index, image in enumerate(images):
            check_image(index, image)
        scales = max_depths(spec, max_depth, len(images))
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
        check_input_size(input_size)
        check_image(0, image)
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
        scales = max_depths(spec, max_depth, len(prepared))
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
                resized = to_host(resized)
                bounds = None if bounds is None else to_host(bounds)
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
        """``batch`` with each EncodedJpeg decoded on the device as CHW RGB uint8 (see ``DeviceJpegDecoder``)."""
        return self._jpeg.decode(batch) if self.decodes_jpeg else list(batch)
