"""The README's commands, run as written.

Every fenced block of README.md is either run here or listed in ``SKIPPED``
with the reason; a block that changes, or a new one, fails
``test_every_block_is_run_or_listed`` until it is one or the other.

Blocks run the way a reader pastes them: shell blocks one line at a time in a
bash "terminal" that keeps what ``export`` sets (a line that starts
``zdepth serve``, ``zdepth broker`` or ``zdepth worker`` runs in the
background, and the next line waits for its log to say it is ready, as a
reader would), Python blocks into an interactive ``python -i`` prompt. Each
terminal works in a temp folder with a home of its own. When a part's blocks
are done, its servers get SIGTERM and must exit 0. Every command must exit 0
and show what it promises (files written, workers listed, an answer).

Only what a reader would change for their own machine is changed, and each
change is in ``SUBSTITUTIONS`` (in the text of a block) or ``ENVIRONMENT`` (in
the environment of every terminal), with the reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import data_file
from procs import REPO, free_port

README = REPO / "README.md"

# ----------------------------------------------------------------------------- what is run, changed and skipped


@dataclass(frozen=True)
class Run:
    """A block that is run: found by its section and a line it holds (its full text may change: it is run as it is)."""

    name: str
    section: str
    holds: str


RUN = (
    Run("serve", "Quick start on one box", "zdepth serve --model vits"),
    Run("clients", "Quick start on one box", "zdepth health --server tcp://gpu-box:5555"),
    Run("python client", "Quick start on one box", "with zdepth.Client("),
    Run("lan broker", "A lab LAN with several GPU hosts", "zdepth broker --clients"),
    Run("lan workers", "A lab LAN with several GPU hosts", "zdepth worker --broker tcp://broker-box:5556"),
    Run("gateway", "Keeping old HTTP clients", "zdepth gateway --broker"),
    Run("pointcloud", "The `zdepth` command", "zdepth predict tests/data/demo01.jpg"),
    Run("curve", "Security", "zdepth keygen broker"),
    Run("curve python", "Security", "from zdepth.protocol.curve import CurveClient"),
    Run("metrics", "Monitoring", "zdepth broker --metrics-port"),
)


@dataclass(frozen=True)
class Skip:
    """A block that is not run: its section, first line and sha256 (first 12 hex digits), and why."""

    section: str
    first_line: str
    digest: str
    why: str


SKIPPED = (
    Skip(
        "", "# Serve (on a GPU box; --download fetches the checkpoint once, or put it in ~/.cache/zdepth/weights):", "1d8aa30ccdeb",
        "creates a virtual environment and pip-installs from the network, then serves on a GPU with a downloaded "
        "checkpoint or runs the whole suite (this test included); the Quick start's serve line runs here (test_quick_start)",
    ),
    Skip(
        "Python API", "import zdepth", "a69def471006",
        "a reference of every call, with the reader's own objects (image, camera_frames(), show) and ViT-L models that "
        "the generated checkpoints lack; tests/test_client*.py and tests/test_public_api.py make each call",
    ),
    Skip("The `zdepth` command", "[lab]", "0ae63383bce1", "a profiles.toml file, not a command (tests/test_profiles.py reads such files)"),
    Skip("Monitoring", "scrape_configs:", "9baa6ed354f1", "a Prometheus configuration file (prometheus.yml), not a command"),
    Skip("Monitoring", "groups:", "bcaa62303028", "Prometheus alerting rules, not a command"),
    Skip("Development", "zdepth/", "15119f57ae66", "a picture of the source tree, not a command (tests/test_public_api.py pins its import graph)"),
    Skip(
        "Development", 'pip install -e ".[worker,test,bench]"', "48874107c5b5",
        "pip-installs from the network, then runs the whole suite, this test included",
    ),
)


@dataclass(frozen=True)
class Sub:
    """A change to the text of the blocks named in ``blocks``: ``pattern`` (a regular expression, multiline) becomes
    ``replacement`` (str.format fields: tmp, key and the free ports of ``Place.ports``). It must apply to each of those
    blocks, so a README change that makes one stale fails."""

    pattern: str
    replacement: str
    blocks: tuple[str, ...]
    why: str


SUBSTITUTIONS = (
    Sub(r"^pip install .*\n", "", ("serve", "gateway"),
        "the package is installed already (this suite runs from the installed checkout); pip would need the network"),
    Sub(r" --download\b", "", ("serve",),
        "checkpoints are local (ZDEPTH_WEIGHTS_DIR holds generated ones); there is no network to download from"),
    Sub(r"^export ZDEPTH_KEY=\.\.\.", "export ZDEPTH_KEY={key}", ("clients",),
        "'...' stands for the key the serve terminal exported; the reader pastes it"),
    Sub(r"\b(gpu-box|broker-box)\b", "127.0.0.1", ("clients", "python client", "lan workers", "gateway", "curve", "curve python"),
        "one machine plays every host"),
    Sub(r":5555\b", ":{client_port}", ("clients", "python client", "lan broker", "gateway", "curve", "curve python"),
        "a free port: other tests may be listening on 5555 at the same time"),
    Sub(r":5556\b", ":{worker_port}", ("lan broker", "lan workers", "curve"),
        "a free port: other tests may be listening on 5556 at the same time"),
    Sub(r"--port 8000\b", "--port {http_port}", ("gateway",), "a free port: other tests may be listening on 8000"),
    Sub(r"--seconds 20\b", "--seconds 2", ("clients",), "a short run: this is a test, not a measurement"),
    Sub(r"/etc/zdepth\b", "{tmp}/etc/zdepth", ("lan broker", "lan workers", "gateway", "curve", "curve python"),
        "a folder the reader can write: tests do not write /etc"),
    Sub(r"--device cuda:\d+", "--device cpu", ("lan workers",), "no GPU: one CPU worker per line instead"),
    Sub(r"\bvitl\b", "vits", ("lan workers",), "the generated checkpoints are ViT-S only (vits, vits-hypersim)"),
    Sub(r" \.\.\.(?= +#)", "", ("metrics",),
        "'...' stands for the command's other options; here they come from the environment (ports, the broker's address)"),
    Sub(r"--metrics-port 9100\b", "--metrics-port {metrics_port}", ("metrics",),
        "a free port: other tests may be listening on 9100"),
    Sub(r"--metrics-port 9101\b", "--metrics-port {worker_metrics_port}", ("metrics",),
        "a free port: other tests may be listening on 9101"),
)

# The environment of every terminal: what differs from a reader's machine. Nothing here is in a command's text.
ENVIRONMENT = {
    "HOME": ("a folder of the test's own", "keygen writes into ~/.config/zdepth/curve, profiles are read from ~/.config"),
    "PATH": ("this interpreter's bin folder first", "the `zdepth` and `python` of this installation, as in an activated venv"),
    "ZDEPTH_WEIGHTS_DIR": ("the generated checkpoints (fixture weights_dir)", "instead of ~/.cache/zdepth/weights: no download"),
    "ZDEPTH_DEVICE": ("cpu", "serve and predict on the CPU even where a GPU is visible"),
    "ZDEPTH_CLIENTS": ("tcp://127.0.0.1:<free port>", "for commands that listen on the default 5555 without naming it"),
    "ZDEPTH_WORKERS": ("tcp://127.0.0.1:<free port>", "for commands that listen on the default 5556 without naming it"),
    "ZDEPTH_BROKER": ("tcp://127.0.0.1:<that port>", "the Monitoring worker's broker, which its '...' leaves out"),
    "ZDEPTH_INPUT_SIZE": ("182", "predict and bench at network input 182 instead of 518 (an eighth of the tokens): bench's 8 streams on a 2-core CPU"),
    "OMP_NUM_THREADS": ("1", "one torch thread per process: the test machines have few cores"),
    "PYTHONUNBUFFERED": ("1", "servers' logs reach their files at once, so a ready line is seen when it is written"),
}

SERVER_LINE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*zdepth\s+(serve|broker|worker|gateway)\b")
READY_LINE = {
    "serve": "registered with broker",
    "worker": "registered with broker",
    "broker": "broker listening",
    "gateway": "zdepth gateway listening on",
}

# ----------------------------------------------------------------------------- the README's blocks


@dataclass(frozen=True)
class Block:
    section: str
    lang: str
    text: str
    line: int  # of the opening fence, 1-based

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    @property
    def first_line(self) -> str:
        return self.text.splitlines()[0] if self.text else ""

    def describe(self) -> str:
        return f"README.md line {self.line} ({self.section or 'the top'}, ```{self.lang}, sha256 {self.digest}):\n{self.text}"


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block, dedented by its fence's indent (blocks inside list items are indented)."""
    lines = (README.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    section = ""
    i = 0
    while i < len(lines):
        heading = re.match(r"^## (.+?)\s*$", lines[i])
        if heading:
            section = heading.group(1)
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if fence:
            indent, lang = fence.group(1), fence.group(2)
            body: list[str] = []
            j = i + 1
            while j < len(lines) and not re.match(rf"^{indent}```\s*$", lines[j]):
                body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
                j += 1
            assert j < len(lines), f"README.md line {i + 1}: a code fence that is never closed"
            blocks.append(Block(section, lang, "\n".join(body) + "\n", i + 1))
            i = j
        i += 1
    return blocks


def find_run(run: Run, blocks: list[Block] | None = None) -> Block:
    found = [b for b in blocks or readme_blocks() if b.section == run.section and run.holds in b.text]
    assert len(found) == 1, f"{len(found)} blocks of section {run.section!r} hold {run.holds!r}; the RUN table needs updating"
    return found[0]


def substituted(name: str, block: Block, **fields: object) -> str:
    """The block's text with every substitution for ``name`` applied; each must apply."""
    text = block.text
    for sub in SUBSTITUTIONS:
        if name in sub.blocks:
            text, count = re.subn(sub.pattern, sub.replacement.format(**fields) if fields else sub.replacement, text, flags=re.M)
            assert count, f"substitution {sub.pattern!r} no longer applies to the {name!r} block; update SUBSTITUTIONS:\n{block.text}"
    return text


def block(name: str, **fields: object) -> str:
    """The README's block for the RUN entry ``name``, substituted."""
    (run,) = [r for r in RUN if r.name == name]
    return substituted(name, find_run(run), **fields)


# ----------------------------------------------------------------------------- the table, without processes


def test_every_block_is_run_or_listed() -> None:
    blocks = readme_blocks()
    assert blocks, "no code blocks found in README.md"
    run_blocks = {find_run(run, blocks).line: run.name for run in RUN}
    skipped = {skip.digest: skip for skip in SKIPPED}
    unlisted = [b for b in blocks if b.line not in run_blocks and b.digest not in skipped]
    assert not unlisted, "README blocks neither run by tests/test_readme.py nor listed in its SKIPPED table:\n\n" + "\n\n".join(
        b.describe() for b in unlisted
    )
    digests = {b.digest for b in blocks}
    stale = [s for s in SKIPPED if s.digest not in digests]
    assert not stale, f"SKIPPED lists blocks the README no longer has: {[(s.section, s.first_line, s.digest) for s in stale]}"
    for skip in SKIPPED:
        block = next(b for b in blocks if b.digest == skip.digest)
        assert (block.section, block.first_line) == (skip.section, skip.first_line), (skip, block.describe())


def test_every_substitution_applies() -> None:
    names = {run.name for run in RUN}
    fields = dict(tmp="/tmp/x", client_port=1, worker_port=2, key="k", metrics_port=3, worker_metrics_port=4, http_port=5)
    for sub in SUBSTITUTIONS:
        assert set(sub.blocks) <= names, sub
    for run in RUN:
        substituted(run.name, find_run(run), **fields)


def test_block_parser_reads_indented_fences() -> None:
    text = "# t\n```bash\na\n```\n## S\n- item:\n  ```python\n  x = 1\n\n  y = 2\n  ```\n"
    assert [(b.section, b.lang, b.text, b.line) for b in readme_blocks(text)] == [
        ("", "bash", "a\n", 2),
        ("S", "python", "x = 1\n\ny = 2\n", 7),
    ]


# ----------------------------------------------------------------------------- terminals


@dataclass
class Server:
    kind: str
    line: str
    popen: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as Ctrl-C's twin; the whole process group is killed only if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.line!r} did not exit within {timeout} s of SIGTERM:\n{self.output()[-3000:]}") from None
        return self.popen.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except OSError:
            pass
        self.popen.wait(10)


@dataclass
class Result:
    line: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class Terminal:
    """A bash terminal: lines run one at a time, ``export`` carries over, servers run in the background."""

    name: str
    cwd: Path
    env: dict[str, str]
    logs: Path
    servers: list[Server] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)

    def paste(self, text: str, *, timeout: float = 240.0) -> None:
        for line in commands(text):
            if match := SERVER_LINE.match(line):
                self.start(match.group(1), line, timeout=timeout)
            else:
                result = self.run(line, timeout=timeout)
                assert result.returncode == 0, f"[{self.name}] `{line}` exited {result.returncode}:\n{result.output[-4000:]}\n{self.server_logs()}"

    def run(self, line: str, *, timeout: float = 240.0) -> Result:
        env_file = self.logs / f"{self.name}.env"
        script = f"{line}\n__status=$?\nenv -0 > {shlex.quote(str(env_file))}\nexit $__status\n"
        done = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if env_file.exists():
            pairs = (item.partition("=") for item in env_file.read_text().split("\0") if "=" in item)
            self.env = {k: v for k, _, v in pairs if k not in ("_", "SHLVL", "PWD", "OLDPWD")}
            env_file.unlink()
        result = Result(line, done.returncode, done.stdout, done.stderr)
        self.results.append(result)
        return result

    def start(self, kind: str, line: str, *, timeout: float) -> Server:
        """Start a server line in the background and wait for its log to say it is ready."""
        log = self.logs / f"{self.name}-{len(self.servers)}-{kind}.log"
        with open(log, "wb") as handle:
            popen = subprocess.Popen(["bash", "-c", line], cwd=self.cwd, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(kind, line, popen, log)
        self.servers.append(server)
        deadline = time.monotonic() + timeout
        while READY_LINE[kind] not in server.output():
            assert popen.poll() is None, f"[{self.name}] `{line}` exited {popen.returncode} before it was ready:\n{server.output()[-4000:]}"
            assert time.monotonic() < deadline, f"[{self.name}] `{line}` not ready after {timeout} s:\n{server.output()[-4000:]}"
            time.sleep(0.2)
        # bash ran the line as a simple command, so it exec'd: SIGTERM reaches zdepth itself, and its status is ours.
        assert not os.readlink(f"/proc/{popen.pid}/exe").endswith("/bash"), f"bash did not exec `{line}`"
        return server

    def python(self, text: str, *, timeout: float = 240.0) -> Result:
        """Paste into an interactive Python prompt (then Enter and end of input)."""
        python = shutil.which("python", path=self.env["PATH"])
        assert python, "no `python` on PATH"
        done = subprocess.run([python, "-i", "-q"], input=text + "\n", cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        result = Result(f"python prompt:\n{text}", done.returncode, done.stdout, done.stderr)
        self.results.append(result)
        assert done.returncode == 0 and not re.search(r"Traceback|^\w*Error:|\bError: ", done.stderr, re.M), (
            f"[{self.name}] the Python prompt failed:\n{text}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}\n{self.server_logs()}"
        )
        return result

    def result(self, holds: str) -> Result:
        found = [r for r in self.results if holds in r.line]
        assert len(found) == 1, f"[{self.name}] {len(found)} commands hold {holds!r}: {[r.line for r in self.results]}"
        return found[0]

    def stop_servers(self) -> None:
        """Last started, first stopped (workers before their broker); each must exit 0."""
        for server in reversed(self.servers):
            code = server.stop()
            assert code == 0, f"[{self.name}] `{server.line}` exited {code} after SIGTERM:\n{server.output()[-4000:]}"

    def kill_servers(self) -> None:
        for server in self.servers:
            if server.popen.poll() is None:
                server.kill()

    def server_logs(self) -> str:
        return "\n".join(f"--- {s.line}\n{s.output()[-2500:]}" for s in self.servers)


def commands(text: str) -> Iterator[str]:
    """The block's command lines: continuations joined, blank and comment-only lines left out."""
    pending = ""
    for raw in text.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            yield line


@dataclass
class Place:
    """The folder and environment every terminal of one test starts from."""

    root: Path
    env: dict[str, str]
    ports: dict[str, int]
    logs: Path

    def terminal(self, name: str) -> Terminal:
        return Terminal(name, self.root, dict(self.env), self.logs)

    @property
    def fields(self) -> dict[str, object]:
        return {"tmp": self.root, **self.ports}


def distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@pytest.fixture
def place(tmp_path: Path, weights_dir: Path) -> Place:
    root = tmp_path / "work"
    home = tmp_path / "home"
    logs = tmp_path / "logs"
    for folder in (root, home, logs):
        folder.mkdir()
    client_port, worker_port, metrics_port, http_port = distinct_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDEPTH_") and k not in ("XDG_CONFIG_HOME", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        HOME=str(home),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")]),
        ZDEPTH_WEIGHTS_DIR=str(weights_dir),
        ZDEPTH_DEVICE="cpu",
        ZDEPTH_CLIENTS=f"tcp://127.0.0.1:{client_port}",
        ZDEPTH_WORKERS=f"tcp://127.0.0.1:{worker_port}",
        ZDEPTH_BROKER=f"tcp://127.0.0.1:{worker_port}",
        ZDEPTH_INPUT_SIZE="182",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    changed = {k for k in env if k.startswith("ZDEPTH_")} | {"HOME", "PATH", "OMP_NUM_THREADS", "PYTHONUNBUFFERED"}
    assert changed == set(ENVIRONMENT), changed ^ set(ENVIRONMENT)  # the table says all that differs
    ports = {
        "client_port": client_port,
        "worker_port": worker_port,
        "metrics_port": metrics_port,
        "worker_metrics_port": metrics_port + 1,
        "http_port": http_port,
    }
    return Place(root, env, ports, logs)


def read_ply_header(path: Path) -> dict[str, str]:
    header: dict[str, str] = {}
    with open(path, "rb") as handle:
        assert handle.readline().strip() == b"ply", path
        for raw in handle:
            line = raw.decode("ascii").strip()
            if line == "end_header":
                return header
            word, _, rest = line.partition(" ")
            header.setdefault(word, rest)
            if word == "element":
                header[f"element {rest.split()[0]}"] = rest.split()[1]
    raise AssertionError(f"{path}: no end_header")


# ----------------------------------------------------------------------------- the parts of the README that run


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_start(place: Place) -> None:
    """Serve in one terminal; health, predict (to the server and in-process), bench and the Python client in another."""
    photos = place.root / "photos"
    photos.mkdir()
    for name in ("demo01.jpg", "demo04.jpg"):
        shutil.copy(data_file(name), photos / name)
    shutil.copy(data_file("demo01.jpg"), place.root / "frame.jpg")

    serving = place.terminal("serve")
    other = place.terminal("client")
    try:
        serving.paste(block("serve", **place.fields))
        key = serving.env.get("ZDEPTH_KEY")
        assert key and len(key) >= 24, "the Quick start's export left no ZDEPTH_KEY"
        assert "ZDEPTH_KEY" not in other.env  # another terminal: the reader pastes the key
        other.paste(block("clients", key=key, **place.fields))

        health = other.result("zdepth health").stdout
        assert re.search(r"^\S+:\d+:cpu\s+\S+\s+cpu\s+.*\bvits,vits-hypersim\b.*\bready\s*$", health, re.M), health

        served = other.result("zdepth predict photos/*.jpg")
        assert "2 image(s)" in served.stdout and "4 file(s) written to depth" in served.stdout, served.output
        for stem in ("demo01", "demo04"):
            depth = np.load(place.root / "depth" / f"{stem}.npy")
            assert depth.dtype == np.float32 and depth.shape == {"demo01": (426, 640), "demo04": (416, 640)}[stem]
            assert np.isfinite(depth).all() and float(depth.max()) > float(depth.min())
            assert (place.root / "depth" / f"{stem}.color.png").stat().st_size > 1000

        cloud = other.result("--format ply")
        assert "2 image(s)" in cloud.stdout and "2 file(s) written to depth" in cloud.stdout, cloud.output
        assert "outside the" not in cloud.output, cloud.output  # the intrinsics fit the photos
        for stem, pixels in (("demo01", 426 * 640), ("demo04", 416 * 640)):
            header = read_ply_header(place.root / "depth" / f"{stem}.ply")
            assert header["element vertex"] == str(pixels), header

        bench = other.result("zdepth bench").stdout
        frames = re.search(r"^frames\s+(\d+)", bench, re.M)
        assert frames and int(frames.group(1)) > 0, bench
        assert re.search(r"^errors\s+0\s*$", bench, re.M), bench

        answer = other.python(block("python client", **place.fields))
        shape_min_max = re.fullmatch(r"\((\d+), (\d+)\) (\S+) (\S+)\s*", answer.stdout)
        assert shape_min_max, answer.output
        assert shape_min_max.group(1, 2) == ("426", "640") and 0 <= float(shape_min_max.group(3)) < float(shape_min_max.group(4)) <= 20.0

        serving.stop_servers()
    finally:
        other.kill_servers()
        serving.kill_servers()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lan_broker_workers_and_http_gateway(place: Place) -> None:
    """The broker with a key file in one terminal, two workers (one per GPU there) in another; both join; then the HTTP
    gateway in front of the broker answers the old server's requests."""
    from zdepth import Client

    broker_box = place.terminal("broker-box")
    gpu_host = place.terminal("gpu-host")
    gateway = place.terminal("gateway")
    try:
        broker_box.paste(block("lan broker", **place.fields))
        key_file = place.root / "etc" / "zdepth" / "key"
        key = key_file.read_text().strip()
        assert len(key) >= 24 and key_file.stat().st_mode & 0o077 == 0
        gpu_host.paste(block("lan workers", **place.fields))
        assert len(gpu_host.servers) == 2
        with Client(f"tcp://127.0.0.1:{place.ports['client_port']}", key=key, timeout=10.0) as client:
            deadline = time.monotonic() + 60
            while len((health := client.health())["workers"]) < 2 and time.monotonic() < deadline:
                time.sleep(0.3)
        assert len(health["workers"]) == 2, health
        assert {pid for w in health["workers"] for pid in [w.get("pid")]} == {s.popen.pid for s in gpu_host.servers}, health
        assert all(sorted(w["models"]) == ["vits", "vits-hypersim"] and w["device"] == "cpu" for w in health["workers"]), health

        # The old HTTP API in front of that broker, with the same key file.
        gateway.paste(block("gateway", **place.fields))
        base = f"http://127.0.0.1:{place.ports['http_port']}"
        with urllib.request.urlopen(f"{base}/health", timeout=30) as response:
            status = json.load(response)
        assert status["status"] == "healthy" and sorted(status["models_loaded"]) == ["vits", "vits-hypersim"], status
        body = json.dumps({"image": base64.b64encode(data_file("demo04.jpg").read_bytes()).decode(), "encoder": "vits", "model_input_size": 182})
        request = urllib.request.Request(
            f"{base}/rel_depth", data=body.encode(), headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        depth = np.frombuffer(base64.b64decode(answer["depth_map"]), dtype="<f4")
        assert depth.size == 416 * 640 and np.isfinite(depth).all(), {k: v for k, v in answer.items() if k != "depth_map"}

        gateway.stop_servers()
        gpu_host.stop_servers()
        broker_box.stop_servers()
    finally:
        gateway.kill_servers()
        gpu_host.kill_servers()
        broker_box.kill_servers()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pointcloud_example_in_process(place: Place) -> None:
    """The command section's example, in-process, on the clone's own photo."""
    (place.root / "tests" / "data").mkdir(parents=True)
    shutil.copy(data_file("demo01.jpg"), place.root / "tests" / "data" / "demo01.jpg")
    shell = place.terminal("shell")
    shell.paste(block("pointcloud", **place.fields))
    result = shell.results[-1]
    assert "1 image(s)" in result.stdout and "1 file(s) written to depth" in result.stdout, result.output
    assert "outside the" not in result.output, result.output
    assert read_ply_header(place.root / "depth" / "demo01.ply")["element vertex"] == str(426 * 640)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_security_curve_walkthrough(place: Place) -> None:
    """keygen, the allow folder, broker, worker and client options, the Python client; a stranger's certificate is refused."""
    shell = place.terminal("shell")
    try:
        shell.paste(block("curve", **place.fields))
        curve_home = Path(shell.env["HOME"]) / ".config" / "zdepth" / "curve"
        for result in shell.results:
            if match := re.match(r"zdepth keygen (\S+)(?: --out (\S+))?", result.line):
                folder = Path(match.group(2)) if match.group(2) else curve_home
                assert (folder / f"{match.group(1)}.key").is_file() and (folder / f"{match.group(1)}.key_secret").is_file(), result.output
                assert (folder / f"{match.group(1)}.key_secret").stat().st_mode & 0o077 == 0
        allowed = sorted(p.name for p in (place.root / "etc" / "zdepth" / "allowed").iterdir())
        assert allowed and "broker.key" not in allowed, allowed
        health = next(r for r in shell.results if r.line.startswith("zdepth health")).stdout
        assert re.search(r":cpu\s+\S+\s+cpu\s+.*\bready\s*$", health, re.M), health

        answer = shell.python(block("curve python", **place.fields))
        assert "'device': 'cpu'" in answer.stdout, answer.output

        # A client whose certificate is not in the allow folder is refused, and the broker says whose.
        stranger = shell.run("zdepth keygen stranger --out stranger")
        assert stranger.returncode == 0, stranger.output
        broker_key = place.root / "etc" / "zdepth" / "curve" / "broker.key"
        refused = shell.run(
            f"zdepth health --server tcp://127.0.0.1:{place.ports['client_port']} --timeout 3 "
            f"--curve-secret stranger/stranger.key_secret --curve-server-key {broker_key}"
        )
        assert refused.returncode == 1, refused.output
        assert "allow" in refused.output and "WORKER" not in refused.output, refused.output
        broker = next(s for s in shell.servers if s.kind == "broker")
        deadline = time.monotonic() + 10
        while "refused a CurveZMQ connection" not in broker.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "refused a CurveZMQ connection" in broker.output(), broker.output()[-3000:]
        shell.stop_servers()
    finally:
        shell.kill_servers()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_monitoring_commands(place: Place) -> None:
    """The broker's and the worker's metrics ports answer with their metrics (their other options from the environment)."""
    text = block("metrics", **place.fields)
    lines = list(commands(text))
    assert [SERVER_LINE.match(line).group(1) for line in lines] == ["broker", "worker", "serve"], lines
    shell = place.terminal("shell")
    try:
        # The first two lines together (a broker and a worker), then the third alone (serve: a broker and its workers).
        shell.paste("\n".join(lines[:2]))
        scrape = {}
        for name, port in (("broker", place.ports["metrics_port"]), ("worker", place.ports["worker_metrics_port"])):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                scrape[name] = response.read().decode()
        assert "zdepth_broker_workers" in scrape["broker"] and "zdepth_worker_held_bytes" in scrape["worker"], scrape
        shell.stop_servers()
        shell.servers.clear()

        shell.paste(lines[2])
        for name, port in (("serve's broker", place.ports["metrics_port"]), ("serve's worker", place.ports["metrics_port"] + 1)):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                assert b"zdepth_" in response.read(), name
        shell.stop_servers()
    finally:
        shell.kill_servers()
