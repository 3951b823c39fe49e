"""The compute side of the worker: models loaded and warmed up, then batches through the engine.

A pipeline of three threads, so that the device does not wait for the host
(see ``zdepth.worker``): the prepare thread waits for each task's decode and
prepares its image, the compute thread forms batches (``collect_batch``) and
starts each forward pass, the reply thread collects the depth maps and builds
the replies. With ``WorkerConfig.pipeline`` off one thread does each batch's
steps in turn. Every task gets exactly one result, handed to the I/O loop
through ``results`` with a wake-up byte: its reply frames, or None when it is
abandoned.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from zdepth import protocol
from zdepth.config import WorkerConfig
from zdepth.engine.batching import collect_batch, padded_batches
from zdepth.errors import ConfigError, InternalError, ServiceError, ZdepthError
from zdepth.metrics import WorkerMetrics
from zdepth.models import DEFAULT_INPUT_SIZE, is_metric_model
from zdepth.protocol import images as imageio
from zdepth.wakeup import Wakeup
from zdepth.worker.cpu import CpuPlan, apply_cpu_plan
from zdepth.worker.engine import Engine, StagedEngine
from zdepth.worker.messages import error_frames, reply_frames
from zdepth.worker.task import Task
from zdepth.worker.traffic import Traffic

__all__ = ["Compute", "Stop"]

logger = logging.getLogger("zdepth.worker")


class Stop:
    """Tells the compute thread to return; its key matches no job's, so it is never batched with one."""

    @property
    def batch_key(self) -> Hashable:
        return id(self)


class Compute:
    """Loads and warms the models, then runs the pipeline's threads until a ``Stop`` comes through ``tasks``.

    The compute thread alone loads, warms up and calls ``engine.run`` (CUDA
    graphs and compiled code stay on one thread). ``loaded`` is set once
    loading ended, with ``load_error`` set if it failed. ``abort`` (set by the
    worker) abandons every task not yet answered.
    """

    def __init__(
        self, engine: Engine, config: WorkerConfig, *, name: str, cpu_plan: CpuPlan | None,
        traffic: Traffic, metrics: WorkerMetrics | None, wakeup: Wakeup,
    ) -> None:  # fmt: skip
        self._engine = cast(StagedEngine, engine)  # its steps are called only when it is staged
        self.config = config
        self.name = name
        self.cpu_plan = cpu_plan
        self._traffic = traffic
        self._metrics = metrics
        self._wakeup = wakeup
        self.tasks: queue.Queue[Task | Stop] = queue.Queue()  # I/O loop -> prepare (or the only) thread
        self._prepared: queue.Queue[Item | Stop] = queue.Queue()  # prepare thread -> compute thread
        self._ran: queue.Queue[Ran | Stop] = queue.Queue()  # compute thread -> reply thread
        self.results: queue.SimpleQueue[tuple[Task, list[Any] | None]] = queue.SimpleQueue()  # -> I/O loop
        self._steps = Steps(engine)
        self.abort = False  # a plain flag: set from a signal handler too
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="zdepth-compute", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, graceful: bool) -> None:
        """Let the threads finish what they hold (graceful) or give them a second, then return."""
        self.tasks.put(Stop())
        if self._thread.ident is not None:  # started (serving metrics may have failed first)
            self._thread.join(timeout=None if graceful else 1.0)

    def _load_models(self) -> None:
        """Load every model and run a forward pass per warm-up size before announcing READY.

        With CUDA graphs, one per padded batch size (1, 2, 4, ... up to max_batch's), so that
        no request waits for a capture; with GPU decoding, one from a JPEG; and one through the
        engine's steps, as requests go.
        """
        batches = [1]
        if self._engine.cuda_graphs:
            batches = padded_batches(self.config.max_batch)
        for model in self.config.models:
            started = time.monotonic()
            try:
                self._engine.load(model)
                for height, width in self.config.warmup_sizes:
                    black = np.zeros((height, width, 3), np.uint8)
                    for count in batches:
                        self._engine.infer([black] * count, model)
                    if self._engine.decodes_jpeg:  # the GPU decoder's start-up, too
                        self._engine.infer([imageio.device_decodable_jpeg(imageio.encode_jpeg(black))], model)
                    if self._steps.staged:  # and the steps requests take: the upload stream, pinned buffers
                        self._engine.collect(self._engine.run([self._engine.prepare(black, DEFAULT_INPUT_SIZE)], model))
            except ValueError as exc:  # a checkpoint that does not fit, a bad warm-up size
                if isinstance(exc, ZdepthError):
                    raise
                raise ConfigError(f"cannot load model {model!r}: {exc}") from exc
            logger.info("model %s ready on %s in %.1f s", model, self.config.device, time.monotonic() - started)

    def _main(self) -> None:
        try:
            if self.cpu_plan is not None:
                apply_cpu_plan(self.cpu_plan, self.config)
            self._load_models()
        except BaseException as exc:  # noqa: BLE001 - handed to run(), which raises it on the I/O thread
            self.load_error = exc
            return
        finally:
            self.loaded.set()
        if not self.config.pipeline:
            self._sequential_loop()
            return
        helpers = [
            threading.Thread(target=self._prepare_loop, name="zdepth-prepare", daemon=True),
            threading.Thread(target=self._reply_loop, name="zdepth-reply", daemon=True),
        ]
        for thread in helpers:
            thread.start()
        try:
            self._compute_loop()  # returns after the stop has passed through the prepare thread
        finally:
            for thread in helpers:
                thread.join(timeout=None if not self.abort else 1.0)

    def _prepare_loop(self) -> None:
        """Pipeline stage one: each task's decoded image, prepared for the device, in arrival order."""
        while True:
            task = self.tasks.get()
            if isinstance(task, Stop):
                self._prepared.put(task)
                return
            try:
                item = self._prepare(task)
            except Exception:  # a bug here must not kill the thread or leave a request unanswered
                logger.exception("internal error preparing request %r", task.request_id)
                self._fail(task, "internal", "internal error in the worker; see its log")
                item = None
            if item is not None:
                self._prepared.put(item)

    def _compute_loop(self) -> None:
        """Pipeline stage two: batches of prepared images through the device, one after another."""
        pending: list[Item | Stop] = []
        max_wait_s = self.config.max_wait_ms / 1000
        while True:
            batch = collect_batch(self._prepared, max_batch=self.config.max_batch, max_wait_s=max_wait_s, key=batch_key, pending=pending)
            if isinstance(batch[0], Stop):
                self._ran.put(batch[0])
                return
            try:
                ran = self._run([item for item in batch if self._admit(item.task)])
            except Exception:
                logger.exception("internal error in a batch of %d", len(batch))
                self._fail_unanswered([item.task for item in batch])
                continue
            if ran is not None:
                self._ran.put(ran)

    def _reply_loop(self) -> None:
        """Pipeline stage three: wait for each batch's depth maps, build and hand over the replies."""
        while True:
            ran = self._ran.get()
            if isinstance(ran, Stop):
                return
            try:
                self._reply(ran)
            except Exception:
                logger.exception("internal error replying to a batch of %d", len(ran.items))
            self._fail_unanswered([item.task for item in ran.items])

    def _sequential_loop(self) -> None:
        """The same steps on one thread, each batch's in turn (``WorkerConfig.pipeline`` off)."""
        pending: list[Task | Stop] = []
        max_wait_s = self.config.max_wait_ms / 1000
        while True:
            batch = collect_batch(self.tasks, max_batch=self.config.max_batch, max_wait_s=max_wait_s, key=batch_key, pending=pending)
            if isinstance(batch[0], Stop):
                return
            try:
                items = [item for item in map(self._prepare, batch) if item is not None]
                ran = self._run(items)
                if ran is not None:
                    self._reply(ran)
            except Exception:  # a bug here must not kill the thread or leave a request unanswered
                logger.exception("internal error in a batch of %d", len(batch))
            self._fail_unanswered(batch)

    def _admit(self, task: Task) -> bool:
        """Whether the task goes on; an abandoned (old connection, abort) or late one is settled here."""
        if self.abort or task.generation != task.link.generation:
            task.decoded.cancel()
            self._emit(task, None)
            return False
        now = time.monotonic()
        if task.deadline is not None and now >= task.deadline:
            task.decoded.cancel()
            late_ms = (now - task.deadline) * 1000
            self._fail(task, "timeout", f"the deadline passed {late_ms:.0f} ms before inference could start; the worker is busy")
            return False
        return True

    def _prepare(self, task: Task) -> Item | None:
        """The task's image, decoded and prepared for the engine; None when the task was answered instead."""
        if not self._admit(task):
            return None
        try:
            image = task.decoded.result()
            return Item(task, self._steps.prepare(image, task.batch_key[1]))
        except ServiceError as exc:
            self._fail(task, exc.code, exc.message)
        except Exception as exc:
            logger.exception("decoding or preparing the image of request %r failed", task.request_id)
            self._fail(task, "internal", f"decoding the image failed: {type(exc).__name__}: {exc}")
        return None

    def _run(self, items: list[Item]) -> Ran | None:
        """Start one forward pass over ``items``; when it fails, each is run alone, so one bad input fails alone."""
        if not items:
            return None
        started = time.monotonic()
        parts = self._run_parts(items)
        self._traffic.batch(len(items))
        model, input_size = items[0].task.batch_key
        logger.debug("batch of %d for %s at %d started", len(items), model, input_size)
        return Ran(items, parts, started)

    def _run_parts(self, items: list[Item]) -> list[tuple[list[Item], Any]]:
        try:
            return [(items, self._steps.run([item.prepared for item in items], [item.task for item in items]))]
        except Exception as exc:
            if len(items) > 1:
                logger.warning("batch of %d failed (%s: %s); retrying one by one", len(items), type(exc).__name__, exc)
                return [part for item in items for part in self._run_parts([item])]
            if isinstance(exc, ServiceError):
                return [(items, exc)]
            logger.exception("inference failed for request %r", items[0].task.request_id)
            return [(items, InternalError(f"inference failed: {type(exc).__name__}: {exc}"))]

    def _reply(self, ran: Ran) -> None:
        """Wait for a batch's depth maps and hand each task its reply."""
        depths: list[tuple[Item, Any]] = []
        for items, outcome in ran.parts:
            if not isinstance(outcome, ServiceError):
                try:
                    outcome = self._steps.collect(outcome)
                except Exception as exc:
                    logger.exception("inference failed for a batch of %d", len(items))
                    outcome = InternalError(f"inference failed: {type(exc).__name__}: {exc}")
            depths += zip(items, outcome) if not isinstance(outcome, ServiceError) else [(item, outcome) for item in items]
        infer_ms = (time.monotonic() - ran.started) * 1000
        model, input_size = ran.items[0].task.batch_key
        if self._metrics is not None:
            self._metrics.inference(infer_ms / 1000, len(ran.items), model)
        logger.debug("batch of %d for %s at %d: %.1f ms", len(ran.items), model, input_size, infer_ms)
        for item, result in depths:
            task = item.task
            if isinstance(result, ServiceError):
                self._fail(task, result.code, result.message)
                continue
            depth, depth_range = result
            timings = {"queue_ms": (ran.started - task.received) * 1000, "infer_ms": infer_ms}
            try:
                timings["worker_ms"] = (time.monotonic() - task.received) * 1000
                frames = reply_frames(task, depth, worker=self.name, timings=timings, batch=len(ran.items), depth_range=depth_range)
                self._emit(task, frames, protocol.STATUS_OK)
            except ServiceError as exc:
                self._fail(task, exc.code, exc.message)
            except Exception as exc:
                logger.exception("building the reply to request %r failed", task.request_id)
                self._fail(task, "internal", f"building the reply failed: {type(exc).__name__}: {exc}")

    def _fail_unanswered(self, tasks: list[Task]) -> None:
        for task in tasks:
            if not task.done:
                self._fail(task, "internal", "internal error in the worker; see its log")

    def _fail(self, task: Task, code: str, message: str) -> None:
        self._emit(task, error_frames(task.rid, task.request_id, code, message), code)

    def _emit(self, task: Task, frames: list[Any] | None, status: str | None = None) -> None:
        """Hand one task's reply (None: abandoned) and its status to the I/O loop; each task gets exactly one."""
        if task.done:
            return
        task.done = True
        task.status = status
        self.results.put((task, frames))
        self._wakeup.set()


@dataclass(eq=False)
class Item:
    """A task whose image the engine has prepared."""

    task: Task
    prepared: Any

    @property
    def batch_key(self) -> Hashable:
        return self.task.batch_key


@dataclass(eq=False)
class Ran:
    """A batch whose forward pass was started: each part (the whole batch, or after a failure each
    item alone) with what the engine returned for it, or the error that fails it."""

    items: list[Item]
    parts: list[tuple[list[Item], Any]]
    started: float  # time.monotonic()


class Steps:
    """How a batch goes through the engine: prepare each image, run the batch, collect the depth maps.

    A ``staged`` engine (``StagedEngine``: zdepth.engine.Engine) has its
    three steps called on the pipeline's three threads. Any other engine
    (``infer`` only: a custom engine, a test double) runs whole in ``run``, on
    the compute thread.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = cast(StagedEngine, engine)
        self.staged = engine.staged

    def prepare(self, image: Any, input_size: int) -> Any:
        return self.engine.prepare(image, input_size) if self.staged else image

    def run(self, prepared: list[Any], tasks: list[Task]) -> Any:
        model, input_size = tasks[0].batch_key
        max_depth = [task.params.max_depth for task in tasks] if is_metric_model(model) else None
        if self.staged:
            # float16 replies are cast on the device (half the bytes to copy back); a point cloud needs float32 depth.
            float16 = [task.params.depth_dtype == "float16" and task.op != protocol.OP_POINTCLOUD for task in tasks]
            return self.engine.run(prepared, model, max_depth=max_depth, float16=float16)
        return list(self.engine.infer(prepared, model, input_size=input_size, max_depth=max_depth))

    def collect(self, ran: Any) -> list[tuple[np.ndarray, tuple[float, float] | None]]:
        """Each depth map with its (min, max) when the engine took them on the device, else None."""
        if not self.staged:
            return [(depth, None) for depth in ran]
        return list(zip(self.engine.collect(ran), ran.ranges()))


def batch_key(item: Task | Item | Stop) -> Hashable:
    return item.batch_key
