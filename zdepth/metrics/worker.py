"""A worker's metrics: counters and histograms its threads update, and what it holds read per scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from zdepth import __version__
from zdepth.metrics.common import BATCH_BUCKETS, LATENCY_BUCKETS, OTHER, log, op_label, prometheus, status_label

DECODERS = ("cpu", "device", "raw")  # where a worker turned an image into pixels; raw: it came as pixels


class WorkerMetrics:
    """A worker's metrics; every method may be called from any of the worker's threads.

    ``models`` are the models the worker serves (other values are labelled
    ``other``); ``name`` and ``device`` label ``zdepth_worker_info``.
    """

    def __init__(self, models: Iterable[str], *, name: str, device: str, registry: Any = None) -> None:
        prometheus_client = prometheus()
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self._models = frozenset(models)
        self.device = device
        self._requests = prometheus_client.Counter(
            "zdepth_worker_requests", "Requests the worker answered, by op, model and status (ok or the error code).", ["op", "model", "status"], registry=self.registry
        )
        self._latency = prometheus_client.Histogram(
            "zdepth_worker_request_seconds", "From a request's arrival at the worker to its reply, by model.", ["model"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self._inference = prometheus_client.Histogram(
            "zdepth_worker_inference_seconds", "One batch's forward pass, from its start to its depth maps on the host, by model.", ["model"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self._batch = prometheus_client.Histogram(
            "zdepth_worker_batch_size", "Requests per forward pass, by model.", ["model"], buckets=BATCH_BUCKETS, registry=self.registry
        )
        self._decoded = prometheus_client.Counter(
            "zdepth_worker_images_decoded", "Images turned into pixels: on the CPU (cv2), on the device (nvjpeg), or sent raw.", ["where"], registry=self.registry
        )
        for where in DECODERS:
            self._decoded.labels(where)  # every series present from the start, so rates work at once
        prometheus_client.Info("zdepth_worker", "The worker's version, name and device.", registry=self.registry).info(
            {"version": __version__, "name": name, "device": device}
        )
        prometheus_client.ProcessCollector(registry=self.registry)
        self._read_held: Callable[[], tuple[int, int]] | None = None
        self._read_memory: Callable[[], Mapping[str, int]] | None = None
        self.registry.register(_WorkerStateCollector(self))

    def _model(self, model: Any) -> str:
        if not model:
            return ""
        return model if model in self._models else OTHER

    def request_done(self, op: str | None, model: str | None, status: str, seconds: float | None = None) -> None:
        """A reply was sent; ``seconds`` from the request's arrival, when known. op and model may be None
        for a request refused before they were read (they are then labelled empty)."""
        model = self._model(model)
        self._requests.labels(op_label(op), model, status_label(status)).inc()
        if seconds is not None:
            self._latency.labels(model).observe(seconds)

    def inference(self, seconds: float, batch_size: int, model: str) -> None:
        """One forward pass of ``batch_size`` requests took ``seconds``."""
        model = self._model(model)
        self._inference.labels(model).observe(seconds)
        self._batch.labels(model).observe(batch_size)

    def decoded(self, where: str) -> None:
        """One image went to a decoder: ``cpu``, ``device`` or ``raw`` (pixels as sent)."""
        if where not in DECODERS:
            raise ValueError(f"where must be one of {', '.join(DECODERS)}, got {where!r}")
        self._decoded.labels(where).inc()

    def read_held(self, read: Callable[[], tuple[int, int]]) -> None:
        """At scrape time, ``read()`` gives (requests held, image bytes held) by the worker."""
        self._read_held = read

    def read_device_memory(self, read: Callable[[], Mapping[str, int]]) -> None:
        """At scrape time, ``read()`` gives device memory in bytes by kind (``cuda_memory`` makes one for CUDA)."""
        self._read_memory = read


class _WorkerStateCollector:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        metrics = self._metrics
        if metrics._read_held is not None:
            requests, size = metrics._read_held()
            yield GaugeMetricFamily("zdepth_worker_held_requests", "Requests the worker holds: decoding, waiting for a batch, or in one.", value=requests)
            yield GaugeMetricFamily("zdepth_worker_held_bytes", "Image bytes the worker holds, counting the peak cost of decoding them.", value=size)
        if metrics._read_memory is not None:
            try:
                memory = metrics._read_memory()
            except Exception:  # a failing device query must not fail the whole scrape
                log.warning("reading device memory failed", exc_info=True)
                return
            family = GaugeMetricFamily("zdepth_worker_device_memory_bytes", "Device memory: allocated by tensors, reserved by the allocator, total.", labels=["device", "kind"])
            for kind, value in sorted(memory.items()):
                family.add_metric([metrics.device, kind], value)
            yield family


def cuda_memory(device: str) -> Callable[[], dict[str, int]]:
    """A reader of ``device``'s memory for ``WorkerMetrics.read_device_memory``: the caching
    allocator's allocated and reserved bytes (no CUDA call, safe from the exporter's thread) and
    the device's total."""
    import torch  # the worker has it loaded already; the broker never calls this

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory

    def read() -> dict[str, int]:
        return {
            "allocated": torch.cuda.memory_allocated(index),
            "reserved": torch.cuda.memory_reserved(index),
            "total": total,
        }

    return read
