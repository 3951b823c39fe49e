"""Idle means idle: a worker that has served requests, and its broker, use next to no CPU while
nothing comes. A poll loop that never clears its wake-up spins a whole core, which on a 2-core box
halves the forward pass's speed."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from procs import start_live_server, stat_fields
from zdepth import Client

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS


@pytest.mark.slow
def test_worker_and_broker_are_quiet_after_serving(tmp_path, weights_dir):
    server = start_live_server(tmp_path, weights_dir, models=("vits",))
    try:
        frame = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        with Client(server.client_address, key=server.key, input_size=28) as client:
            for _ in range(5):
                client.relative_depth(frame)
        time.sleep(0.5)  # replies sent, the last summary and heartbeats settled
        broker, worker = (proc.pid for proc in server.procs)
        before = {pid: cpu_seconds(pid) for pid in (broker, worker)}
        time.sleep(3.0)
        used = {pid: cpu_seconds(pid) - before[pid] for pid in (broker, worker)}
        # Heartbeats and the summary cost milliseconds; a spinning loop costs the whole 3 s.
        assert used[worker] < 0.5, f"the idle worker used {used[worker]:.2f} s of CPU in 3 s"
        assert used[broker] < 0.5, f"the idle broker used {used[broker]:.2f} s of CPU in 3 s"
    finally:
        server.stop()
