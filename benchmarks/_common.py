"""What every benchmark shares: statistics, tables, JSON results, machine facts,
test frames, generated checkpoints and helper processes.

Benchmarks are scripts (``python benchmarks/<name>.py``), not tests: they
measure, print a table with the baseline beside each result, and write JSON
(by default to ``benchmarks/results/<name>.json``). This module puts the
repository root on ``sys.path`` so they run from a plain checkout.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import json
import math
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS_DIR = HERE / "results"
CPU_THREADS_NOTE = (
    "with as many OpenMP threads as cores, every operator's barrier waits for a thread that another "
    "process has pushed off a core, and a forward pass on a busy 2-core machine runs 10x slower; "
    "one thread degrades gracefully"
)
FRAME_SHAPE = (480, 640)
ENCODERS = ("vits", "vitb", "vitl")


# ----------------------------------------------------------------------------- statistics


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max of latencies in milliseconds (nearest-rank percentiles)."""
    values = sorted(samples_ms)
    if not values:
        return {"n": 0}

    def pct(p: float) -> float:
        rank = max(1, math.ceil(p / 100 * len(values)))
        return values[rank - 1]

    return {
        "n": len(values),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "mean": sum(values) / len(values),
        "min": values[0],
        "max": values[-1],
    }


def time_calls(fn: Callable[[], Any], *, iterations: int, warmup: int) -> list[float]:
    """Milliseconds per call of ``fn``, one sample per call, warm-up calls discarded."""
    for _ in range(warmup):
        fn()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        fn()
        samples.append((clock() - start) / 1e6)
    return samples


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


# ----------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        return f"{value:.{digits}g}" if magnitude < 0.01 else f"{value:.{digits - 1}f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str | None = None) -> str:
    """A GitHub-markdown table (readable in a terminal too)."""
    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")
    return "\n".join(lines)


class Report:
    """Tables and notes printed as they come and kept (as markdown) for the JSON and RESULTS.md."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str | None = None) -> None:
        if not rows:
            return
        self._add(table(rows, columns, title=title))

    def note(self, text: str) -> None:
        self._add(text)

    def _add(self, text: str) -> None:
        print()
        print(text)
        self.parts.append(text)


def write_json(name: str, data: dict[str, Any], path: str | os.PathLike | None, *, quiet: bool = False) -> Path:
    """Write a result (``quiet``: a partial one, saved as a run goes so a killed run leaves its data)."""
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if "command" not in data:
        script = Path(sys.argv[0])
        try:
            script = script.resolve().relative_to(ROOT)
        except ValueError:
            pass
        data = {"command": " ".join(["python", str(script), *sys.argv[1:]]), **data}
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    if not quiet:
        print(f"\nwrote {out}")
    return out


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny run that only checks the benchmark works")
    parser.add_argument("--json", metavar="PATH", help="where to write the results (default benchmarks/results/<name>.json)")
    return parser


# ----------------------------------------------------------------------------- the machine


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(*, torch_info: bool = True) -> dict[str, Any]:
    """Where and when a result was measured: CPU, cores, load, GPU, library versions."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: _version(dist)
            for name, dist in (
                ("numpy", "numpy"),
                ("pyzmq", "pyzmq"),
                ("msgpack", "msgpack"),
                ("msgpack-numpy", "msgpack-numpy"),
                ("opencv", "opencv-python-headless"),
                ("torch", "torch"),
                ("torchvision", "torchvision"),
                ("fastapi", "fastapi"),
                ("uvicorn", "uvicorn"),
                ("requests", "requests"),
            )
        },
    }
    try:
        import zmq

        info["versions"]["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    try:
        import zdepth

        info["versions"]["zdepth"] = zdepth.__version__
    except ImportError:
        pass
    if torch_info and _version("torch"):
        try:
            import torch

            info["torch_threads"] = torch.get_num_threads()
            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(0)
                info["gpu"] = props.name
                info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
                info["cuda"] = torch.version.cuda
                info["cudnn"] = torch.backends.cudnn.version()
        except Exception as exc:  # a broken CUDA install must not hide the CPU numbers
            info["gpu_error"] = f"{type(exc).__name__}: {exc}"
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (
        f"{info['date']} | {info['cpu']} x{info['cores']} cores{gpu} | load {info.get('load_avg_1m')} | "
        f"python {info['python']}, torch {info['versions'].get('torch')}, pyzmq {info['versions'].get('pyzmq')} "
        f"(libzmq {info['versions'].get('libzmq')})"
    )


# ----------------------------------------------------------------------------- frames


TEST_DATA = ROOT / "tests" / "data"


def data_dirs() -> list[Path]:
    """Where the test photos may be: $ZDEPTH_DATA (a folder of .jpg photos), then tests/data."""
    found = []
    if os.environ.get("ZDEPTH_DATA"):
        found.append(Path(os.environ["ZDEPTH_DATA"]))
    found.append(TEST_DATA)
    return [d for d in found if d.is_dir()]


def photo_paths() -> list[Path]:
    for directory in data_dirs():
        photos = sorted(directory.glob("*.jpg"))
        if photos:
            return photos
    return []


def synthetic_frame(height: int, width: int, seed: int = 0):
    """A smooth image with texture, JPEG-compressible like a photo (used when no photos are found)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 37 + c) * np.cos(y / 23 - c) for c in range(3)], axis=-1)
    noise = rng.normal(0, 12, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def frames_bgr(count: int = 2, shape: tuple[int, int] = FRAME_SHAPE) -> list:
    """``count`` HxWx3 uint8 BGR frames: the test photos resized to ``shape``, or synthetic ones."""
    import cv2

    frames = []
    for path in photo_paths():
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            frames.append(cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA))
    index = 0
    while len(frames) < count:
        frames.append(synthetic_frame(*shape, seed=index))
        index += 1
    return [frames[i % len(frames)] for i in range(count)]


def jpeg_bytes(frame, quality: int = 90) -> bytes:
    import cv2

    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return data.tobytes()


# ----------------------------------------------------------------------------- checkpoints


def make_checkpoints(directory: str | os.PathLike, encoders: Iterable[str], *, seed: int = 0, metric: bool = False) -> Path:
    """Random-weight checkpoints in the official format (flat fp16 state dict, official
    key names and file names) for ``encoders``; returns ``directory``.

    Timing does not depend on the weights' values, and real weights cannot be
    downloaded where these run. A file already there is kept.
    """
    import torch

    from depth_anything_v2 import build_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for encoder in encoders:
        target = directory / f"depth_anything_v2_{encoder}.pth"
        if not target.exists():
            torch.manual_seed(seed)
            state = {k: v.half() for k, v in build_model(encoder).state_dict().items()}
            torch.save(state, target)
            del state
        if metric:
            for dataset in ("hypersim", "vkitti"):
                link = directory / f"depth_anything_v2_metric_{dataset}_{encoder}.pth"
                if not link.exists():
                    os.link(target, link)
    return directory


def seeded_vits_checkpoint(target: Path) -> Path:
    """The test suite's seeded vits weights (tests/seeded_weights.py), fp32, official format.

    Unlike PyTorch's default init, they give depth maps that vary across the image (the test
    suite's golden outputs come from them), so accuracy checks compare something."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("seeded_weights", ROOT / "tests" / "seeded_weights.py")
    seeded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeded)
    torch.save(seeded.seeded_state_dict(), target)
    return target


def prepare_weights(directory: str | os.PathLike | None, encoders: Iterable[str]) -> tuple[Path, str]:
    """A weights dir holding a checkpoint for each encoder; returns it and where the weights came from.

    Files already there (official checkpoints, or a previous benchmark's) are used
    as they are; missing ones are generated there: vits from the test suite's
    seeded recipe, the others with random weights (seed 0). Without ``directory``,
    a temporary folder removed at exit. Point it at a folder of your own, not at
    the weights dir a server uses: generated files carry the official names.
    """
    if directory is None:
        directory = tempfile.mkdtemp(prefix="zdepth-bench-weights-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sources = []
    for encoder in encoders:
        target = directory / f"depth_anything_v2_{encoder}.pth"
        if target.exists():
            sources.append(f"{encoder}: {target.resolve()}")
        elif encoder == "vits":
            seeded_vits_checkpoint(target)
            sources.append(f"{encoder}: seeded (tests/seeded_weights.py)")
        else:
            make_checkpoints(directory, [encoder])
            sources.append(f"{encoder}: random (seed 0)")
    return directory, ", ".join(sources)


# ----------------------------------------------------------------------------- helper processes


def checkout_pythonpath() -> str:
    """PYTHONPATH for a child process that must import this checkout's zdepth first, whatever else is installed."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (zdepth.testing's, imported when first needed)."""
    from zdepth.testing import free_port

    return free_port()


def spawn_context() -> multiprocessing.context.BaseContext:
    """Fresh interpreters for helper processes: no forked ZeroMQ contexts or torch threads."""
    return multiprocessing.get_context("spawn")


def _run_broker(key: str | None, heartbeat_s: float, workers: str, conn) -> None:
    """Target of the broker process: bind on random loopback ports, report them, serve."""
    import signal

    from zdepth.broker import Broker
    from zdepth.config import BrokerConfig, Heartbeat

    broker = Broker(BrokerConfig(clients="tcp://127.0.0.1:*", workers=workers, key=key, heartbeat=Heartbeat(interval_s=heartbeat_s), drain_timeout_s=0.5))
    conn.send(broker.bind())
    conn.close()
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    broker.run()


def launch_broker(key: str | None = "bench-key", heartbeat_s: float = 1.0, workers: str = "tcp://127.0.0.1:*"):
    """Start the real broker in its own process (clients on a random loopback port); ``wait_broker`` for it."""
    ctx = spawn_context()
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_run_broker, args=(key, heartbeat_s, workers, child), daemon=True, name="zdepth-broker")
    process.start()
    child.close()
    return process, parent


def wait_broker(process, pipe, timeout: float = 60.0):
    """(process, client endpoint, worker endpoint) once the broker has bound its sockets."""
    if not pipe.poll(timeout):
        process.kill()
        raise RuntimeError(f"the broker process did not report its endpoints within {timeout:.0f} s")
    clients, workers = pipe.recv()
    return process, clients, workers


def start_broker(key: str | None = "bench-key", heartbeat_s: float = 1.0, workers: str = "tcp://127.0.0.1:*"):
    """The real broker in its own process; returns (process, client endpoint, worker endpoint)."""
    return wait_broker(*launch_broker(key, heartbeat_s, workers))


def stop_process(process, timeout: float = 10.0) -> None:
    if process is None or not process.is_alive():
        return
    process.terminate()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(5)


def wait_http(process: subprocess.Popen, port: int, timeout: float = 60.0) -> str:
    """The endpoint URL once the HTTP baseline answers its health check."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return f"http://127.0.0.1:{port}/rel_depth"
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the HTTP baseline server did not start (is fastapi/uvicorn installed? pip install fastapi uvicorn requests)")
        time.sleep(0.1)


def wait_for_workers(address: str, key: str | None, count: int, *, timeout: float = 300.0, model: str | None = None) -> dict:
    """Poll the broker's health until ``count`` workers (serving ``model``) are registered."""
    from zdepth.client import Client

    deadline = time.monotonic() + timeout
    with Client(address, key=key, timeout=5.0, retries=0) as client:
        while True:
            health = client.health()
            ready = [w for w in health.get("workers", []) if model is None or model in w.get("models", [])]
            if len(ready) >= count:
                return health
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(ready)} of {count} workers registered within {timeout:.0f} s: {health}")
            time.sleep(0.2)


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """Start ``py-spy record`` on ``pid`` for ``seconds`` (speedscope JSON), if py-spy is installed."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(exe), "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "500", "--format", "raw", "--threads", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
