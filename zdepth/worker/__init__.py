"""The worker: one process per GPU, serving depth requests that its brokers hand it.

An I/O loop, so that heartbeats keep flowing while the GPU is busy, and a
pipeline of three threads, so that the GPU does not wait for the host::

    broker(s) <--DEALER each--> I/O loop (run(), the caller's thread)
                          |  owns the sockets: READY, heartbeats, liveness,
                          |  reconnect with back-off, drain on stop(), per broker
                  tasks   v                                      ^  results + a wake-up byte
        prepare thread: wait for the decode, engine.prepare      |
                          v  prepared images                     |
        compute thread: collect_batch -> engine.run (batch N)    |
                          v  batches in flight                   |
        reply thread:   engine.collect -> reply frames ----------+

While batch N runs on the device, the images of batch N+1 are decoded (by a
small pool as they arrive; cv2 releases the GIL), uploaded and preprocessed,
and the replies of batch N-1 are built. An engine that offers only ``infer``
runs whole on the compute thread. With ``WorkerConfig.pipeline`` off, one
compute thread does each batch's steps in turn (kept for comparison,
benchmarks/overlap.py). Models are loaded and warmed up on the compute
thread, which alone calls ``engine.run`` (CUDA graphs and compiled code stay
on one thread); the engine's steps are made to be called from these threads
(see zdepth.engine).

Only the I/O loop touches ZeroMQ. Finished replies come back through a queue,
with one byte written to a socket pair that the I/O loop polls beside the
DEALER, so replies go out at once without busy polling. (A socket pair rather
than an inproc PAIR: any thread, and a signal handler, may write to it, where
a ZeroMQ socket belongs to one thread.) JPEGs that an engine decodes on the
GPU (``engine.decodes_jpeg``) stay encoded until they are prepared.

Reliability follows the ZeroMQ Guide's Paranoid Pirate worker: a broker silent
for ``heartbeat.expiry_s`` is presumed dead; the worker closes its socket,
waits with exponential back-off and jitter, connects a fresh one and
announces itself again. Requests from a dropped connection are abandoned (the
broker re-queues or fails them), never answered late on the new one.

With several brokers (``WorkerConfig.brokers``, for a broker that is not a
single point of failure) each has its own connection doing all of the above,
and the device is shared: see ``Worker`` for the capacity each is announced.

The package, by concept: ``serve`` (the ``Worker``: lifecycle and I/O loop),
``link`` (one broker connection), ``task`` (a request admitted here, and its
parsing), ``admission`` (limits checked before a request is accepted),
``decoding`` (the decode pool), ``compute`` (model loading and the pipeline),
``cpu`` (a CPU worker's threads and batches), ``messages`` (READY and the
replies), ``traffic`` (the periodic summary) and ``engine`` (what the worker
may call and read on an engine). Every module logs as ``zdepth.worker``.
"""

from __future__ import annotations

import logging

from zdepth.config import WorkerConfig
from zdepth.errors import ConfigError, Unauthorized, WeightsNotFound, ZdepthError
from zdepth.exits import EXIT_ADDRESS, EXIT_CONFIG, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_MISSING, EXIT_OK
from zdepth.metrics import MetricsBindError
from zdepth.signals import on_stop_signals
from zdepth.worker.admission import held_bytes, max_pixels
from zdepth.worker.cpu import CPU_MAX_BATCH, CpuPlan, cpu_plan
from zdepth.worker.serve import Worker

__all__ = ["CPU_MAX_BATCH", "CpuPlan", "Worker", "cpu_plan", "exit_status", "held_bytes", "max_pixels", "run_worker"]

logger = logging.getLogger("zdepth.worker")


def exit_status(exc: BaseException) -> int:
    """The exit status for what stopped a worker: permanent causes (restarting cannot help) get their
    own status (``zdepth.supervisor.PERMANENT_EXITS``), so ``zdepth serve`` and service managers stop
    retrying; anything else is 1, worth another try."""
    if isinstance(exc, (ConfigError, Unauthorized)):  # a bad setting, or a key or certificate the broker refuses
        return EXIT_CONFIG
    if isinstance(exc, WeightsNotFound) or (isinstance(exc, ModuleNotFoundError) and exc.name == "torch"):
        return EXIT_MISSING
    if isinstance(exc, MetricsBindError):
        return EXIT_ADDRESS
    return EXIT_FAILURE


def run_worker(config: WorkerConfig) -> int:
    """Run a worker in this process until SIGTERM or SIGINT; the CLI's ``zdepth worker``.

    The first signal drains (finish held requests, then exit); a second one
    stops at once. Returns the exit status (``exit_status``), after logging
    why: 0 after a stop; 2 for bad settings (ConfigError: device,
    certificates, a checkpoint that does not fit) and for a key or
    certificate a broker refuses; 3 for missing weights; 4 for a metrics port
    in use; 1 for other failures; 130 if interrupted while loading.
    """
    try:
        worker = Worker(config)
    except (ZdepthError, MetricsBindError, ModuleNotFoundError) as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name != "torch":
            raise
        logger.error("%s", exc)
        return exit_status(exc)

    def stop_now() -> None:
        if not worker.serving:
            raise KeyboardInterrupt  # still loading models: nothing to drain
        worker.stop()

    restore = on_stop_signals(worker.stop, stop_now, doing="draining")
    try:
        worker.run()
    except (ZdepthError, MetricsBindError) as exc:
        logger.error("%s", exc)
        return exit_status(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        restore()
    return EXIT_OK
