"""How a CPU worker uses its cores: torch's intra-op threads beside the worker's own, and its batches."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from zdepth.config import WorkerConfig

__all__ = ["CPU_MAX_BATCH", "MAX_CPU_WORKERS", "CpuPlan", "apply_cpu_plan", "available_cores", "cpu_plan", "cpu_workers"]

logger = logging.getLogger("zdepth.worker")

CPU_MAX_BATCH = 4  # a CPU worker's largest batch unless set (see cpu_plan)
MAX_CPU_WORKERS = 4  # the most workers serve starts on a CPU-only box (each holds its own models)


@dataclass(frozen=True)
class CpuPlan:
    """How a CPU worker uses its cores: torch's intra-op threads, and the largest batch."""

    threads: int
    max_batch: int
    why: str  # for the log


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def cpu_plan(config: WorkerConfig, cores: int | None = None) -> CpuPlan:
    """Threads and batching for a worker whose forward pass runs on the CPU.

    The forward pass gets every core but one in 16 (left to decoding, I/O
    and a broker on a big box): the worker's own threads sleep while they
    wait, so they take little from it. On the 2-core build machine (vits at
    input 140, 480x640 JPEG frames, client and broker on the same box) 2
    threads served one stream at 54 ms a frame against 86 ms with 1, and two
    streams at 19.1 against 13.1 frames/s. ``OMP_NUM_THREADS``,
    when set, is an operator's explicit choice and wins over the core count;
    ``config.threads`` wins over both. Batches: up to 4 (a batch of 4 costs
    about 10% less a frame than 4 batches of 1 on the CPU, and a bigger one
    gains little more while every frame in it waits for the whole batch);
    ``config.max_batch`` wins.
    """
    cores = cores or available_cores()
    if config.threads is not None:
        threads, why = config.threads, "as configured"
    elif (env := os.environ.get("OMP_NUM_THREADS", "").strip()).isdigit() and int(env) > 0:
        threads, why = int(env), "from OMP_NUM_THREADS"
    else:
        threads = max(1, cores - cores // 16)
        why = f"{cores} cores" + (f", {cores - threads} left to decoding, I/O and the broker" if threads < cores else "")
    return CpuPlan(threads, config.max_batch or CPU_MAX_BATCH, why)


def cpu_workers(cores: int | None = None) -> tuple[int, int]:
    """How ``zdepth serve`` splits a CPU-only box: (workers, torch threads each).

    One worker per core, up to ``MAX_CPU_WORKERS``, the cores shared out among
    them. Independent workers scale with the cores where one worker's
    intra-op threads do not (a ViT at camera input sizes has small matrices):
    on 2 cores, two 1-thread workers served two streams at 22.6 frames/s
    against 19.1 for one 2-thread worker, though one stream alone waits 85 ms
    instead of 54 (vits, input 140). Each worker holds its own copy of the
    models, hence the cap.
    """
    cores = cores or available_cores()
    workers = max(1, min(cores, MAX_CPU_WORKERS))
    return workers, max(1, cores // workers)


def apply_cpu_plan(plan: CpuPlan, config: WorkerConfig) -> None:
    """Give the forward pass its threads (call it on the thread that runs it) and keep OpenCV's
    own thread pool from competing with them: decoding and preparing run on the worker's threads."""
    import cv2
    import torch

    torch.set_num_threads(plan.threads)
    cv2.setNumThreads(1)
    logger.info(
        "CPU: %d torch threads for the forward pass (%s), batches of up to %d, %s",
        plan.threads, plan.why, config.max_batch, "pipelined" if config.pipeline else "not pipelined",
    )  # fmt: skip
