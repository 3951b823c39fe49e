"""Real zdepth processes for tests: brokers, workers and ``zdepth serve`` as subprocesses.

Torch-free (the test process may import torch for other reasons, these
helpers never do). Every process gets a log file, random free ports and a
hard stop: ``stop()`` sends SIGTERM, then SIGKILL after a grace period, and
is safe to call twice, so ``finally:`` blocks and fixtures can always call it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import data_file
from zdepth.testing import free_port

REPO = Path(__file__).resolve().parents[1]


def child_env(weights_dir: Path | str | None = None, **extra: str | None) -> dict[str, str]:
    """The environment for a zdepth child: this checkout importable, no stray ZDEPTH_* settings,
    one torch thread (the test machines have few cores), and ``extra`` (None removes a variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDEPTH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env["ZDEPTH_CONFIG"] = str(REPO / "tests" / "no-such-profiles.toml")
    env["PYTHONUNBUFFERED"] = "1"
    if weights_dir is not None:
        env["ZDEPTH_WEIGHTS_DIR"] = str(weights_dir)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def zdepth_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "zdepth", *args]


@dataclass
class Proc:
    """A child process with its combined output in ``log``."""

    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Signal, wait, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def spawn(argv: Sequence[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> Proc:
    with open(log, "wb") as handle:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(list(argv), stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return Proc(popen, log)


def wait_for_health(address: str, *, key: str | None = None, workers: int = 1, timeout: float = 90.0, procs: Sequence[Proc] = (), exclude_pids: Sequence[int] = ()) -> dict[str, Any]:
    """Poll the broker until ``workers`` workers (not in ``exclude_pids``) are ready; fails with the logs."""
    from zdepth import Client, ZdepthError

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.popen.args} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            with Client(address, key=key, timeout=2.0, retries=0) as client:
                last = client.health()
        except ZdepthError as exc:
            last = exc
        else:
            ready = [w for w in last.get("workers", []) if not w.get("draining") and w.get("pid") not in exclude_pids]
            if len(ready) >= workers:
                return last
        time.sleep(0.3)
    logs = "\n\n".join(f"--- {p.popen.args[3:5]} ---\n{p.tail()}" for p in procs)
    raise AssertionError(f"no {workers} worker(s) ready at {address} after {timeout} s (last: {last!r})\n{logs}")


@dataclass
class LiveServer:
    """A broker and one CPU worker, as separate ``python -m zdepth`` processes."""

    client_address: str
    worker_address: str
    key: str | None
    procs: list[Proc] = field(default_factory=list)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def start_live_server(
    tmp: Path, weights_dir: Path, *, models: Sequence[str] = ("vits", "vits-hypersim"), key: str | None = "test-key", max_batch: int = 4
) -> LiveServer:
    """Start a broker and a worker on free ports and wait until the worker is ready. Call ``stop()`` in finally."""
    client_port, worker_port = free_port(), free_port()
    server = LiveServer(f"tcp://127.0.0.1:{client_port}", f"tcp://127.0.0.1:{worker_port}", key)
    env = child_env(weights_dir, ZDEPTH_KEY=key)
    try:
        server.procs.append(
            spawn(zdepth_argv("broker", "--clients", server.client_address, "--workers", server.worker_address, "--log-level", "debug"), tmp / "broker.log", env)
        )
        model_args = [arg for m in models for arg in ("--model", m)]
        server.procs.append(
            spawn(
                zdepth_argv(
                    "worker", "--broker", server.worker_address, "--device", "cpu", *model_args,
                    "--warmup", "none", "--max-batch", str(max_batch), "--log-level", "debug",
                ),
                tmp / "worker.log",
                env,
            )
        )  # fmt: skip
        wait_for_health(server.client_address, key=key, procs=server.procs)
    except BaseException:
        server.stop()
        raise
    return server


def stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces): state, ppid, ... (Linux)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields(entry.name)
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def kill_quietly(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def small_image(path: Path, source: str = "demo01.jpg", size: tuple[int, int] = (96, 64)) -> Path:
    """A demo photo resized to ``size`` (width, height), written to ``path``."""
    import cv2

    image = cv2.imread(str(data_file(source)))
    assert image is not None, data_file(source)
    cv2.imwrite(str(path), cv2.resize(image, size, interpolation=cv2.INTER_AREA))
    return path


def two_small_photos(folder: Path) -> Path:
    """``folder`` with a street (JPEG) and a room (PNG), 96x64 each: a folder for predict to read."""
    small_image(folder / "street.jpg", "demo01.jpg")
    small_image(folder / "room.png", "demo04.jpg")
    return folder


def small_video(path: Path, frames: int = 12, size: tuple[int, int] = (96, 64), fps: float = 10.0) -> Path:
    """An MJPG .avi of the demo photo drifting sideways (cv2.VideoWriter), ``frames`` long."""
    import cv2
    import numpy as np

    image = cv2.imread(str(data_file("demo01.jpg")))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened(), "cv2.VideoWriter cannot write MJPG"
    try:
        width = image.shape[1]
        for i in range(frames):
            x = int(i * (width - image.shape[0]) / max(frames, 1))
            crop = image[:, x : x + image.shape[0] * size[0] // size[1]]
            writer.write(np.ascontiguousarray(cv2.resize(crop, size, interpolation=cv2.INTER_AREA)))
    finally:
        writer.release()
    return path


class Relay:
    """A TCP relay to ``127.0.0.1:target_port`` that records every byte, both ways."""

    def __init__(self, target_port: int) -> None:
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def seen(self) -> bytes:
        with self._lock:
            return bytes(self.captured)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            self._sockets += [conn, upstream]
            threading.Thread(target=self._pipe, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            sock.close()
