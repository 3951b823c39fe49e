"""The zdepth command: help, option mapping, predict in-process and against a live server, health, bench.

Option-to-config mapping is checked with the broker and worker replaced by
fakes (fast); everything else runs for real on the CPU with the generated vits
checkpoint, small images and --input-size 28.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import read_ply  # plyfile, not zdepth: an independent reader
from procs import (
    child_env,
    free_port,
    small_video,
    start_live_server,
    two_small_photos,
    zdepth_argv,
)
from zdepth.cli import app, format_health, resolve_server
from zdepth.config import WorkerConfig

COMMANDS = ("broker", "worker", "serve", "predict", "health", "bench", "keygen")
FX, FY, CX, CY = 80.0, 82.0, 47.5, 31.5


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two small photos (64x96)."""
    return two_small_photos(tmp_path_factory.mktemp("images"))


def parse_ply(path: Path) -> np.ndarray:
    """A binary little-endian PLY's vertices with numpy alone (independent of zdepth.pointcloud)."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and "format binary_little_endian 1.0" in header
    count = int(next(line for line in header if line.startswith("element vertex")).split()[2])
    types = {"float": "<f4", "uchar": "u1"}
    fields = [(line.split()[2], types[line.split()[1]]) for line in header if line.startswith("property")]
    vertices = np.frombuffer(data, dtype=fields, count=count, offset=end)
    assert len(data) == end + count * vertices.dtype.itemsize
    return vertices


@pytest.fixture
def with_weights(runner: CliRunner, weights_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ZDEPTH_WEIGHTS_DIR pointing at the generated checkpoints: `worker` checks they exist before it starts."""
    monkeypatch.setenv("ZDEPTH_WEIGHTS_DIR", str(weights_dir))
    return weights_dir


# ----------------------------------------------------------------------------- help and imports


@pytest.mark.timeout(30)
def test_help_lists_every_command(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(runner: CliRunner, command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "--log-level" in result.output
    if command != "keygen":
        assert "--key-file" in result.output and "ZDEPTH_KEY" in result.output


@pytest.mark.timeout(30)
def test_help_shows_env_vars(runner: CliRunner) -> None:
    out = runner.invoke(app, ["worker", "--help"], env={"COLUMNS": "200"}).output
    for name in ("ZDEPTH_BROKER", "ZDEPTH_MODEL", "ZDEPTH_DEVICE", "ZDEPTH_PRECISION", "ZDEPTH_WEIGHTS_DIR", "ZDEPTH_MAX_BATCH", "ZDEPTH_LOG_LEVEL"):
        assert name in out
    out = runner.invoke(app, ["broker", "--help"], env={"COLUMNS": "200"}).output
    for name in ("ZDEPTH_CLIENTS", "ZDEPTH_WORKERS", "ZDEPTH_HEARTBEAT", "ZDEPTH_MAX_QUEUE"):
        assert name in out


def all_options():
    """(command name, option) for every option of every command, the top level's included."""
    import typer.main

    top = typer.main.get_command(app)
    for name, command in [("zdepth", top), *top.commands.items()]:
        for param in command.params:
            if param.param_type_name == "option":
                yield name, param


def test_every_option_has_its_environment_variable() -> None:
    """One rule: --some-option comes from ZDEPTH_SOME_OPTION (the first long name); only --version and --help have none."""
    seen: dict[str, set[str]] = {}
    for command, option in all_options():
        long = next(opt for opt in option.opts if opt.startswith("--"))
        if option.is_eager:  # --version: an action, not a setting
            assert option.envvar is None, (command, long)
            continue
        assert option.envvar == "ZDEPTH_" + long[2:].upper().replace("-", "_"), (command, option.opts, option.envvar)
        seen.setdefault(option.envvar, set()).add(long)
    assert all(len(names) == 1 for names in seen.values()), seen  # one variable, one option name
    assert "ZDEPTH_DEVICES" not in seen and "ZDEPTH_DEVICE" in seen
    assert len(seen) >= 50  # every setting of every command


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_every_variable_shows_choices_and_no_bool_placeholder(runner: CliRunner, command: str) -> None:
    out = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"}).output
    for name, option in all_options():
        if name == command and option.envvar:
            assert f"env var: {option.envvar}" in out, option.envvar
    assert "<bool>" not in out
    assert "<debug|info|warning|error|critical>" in out  # --log-level
    if command in ("worker", "serve", "predict"):
        assert "<auto|fp32|fp16|bf16>" in out and "<auto|cpu|cuda:N>" in out
    if command == "bench":
        assert "<raw|jpeg>" in out
    if command == "predict":
        assert "autumn|bone|jet" in out  # cv2's colour maps
    assert "<bool>" not in runner.invoke(app, ["--help"], env={"COLUMNS": "250"}).output


def test_colour_map_choices_are_cv2s() -> None:
    from zdepth.cli import Colormap
    from zdepth.client.outputs import COLORMAPS

    assert {c.value for c in Colormap} == set(COLORMAPS)


@pytest.mark.timeout(60)
def test_python_m_zdepth_and_no_torch_import() -> None:
    env = child_env()
    out = subprocess.run(zdepth_argv("--help"), capture_output=True, text=True, env=env, timeout=50)
    assert out.returncode == 0, out.stderr
    assert all(command in out.stdout for command in COMMANDS)
    code = (
        "import sys, zdepth.cli\n"
        "from typer.testing import CliRunner\n"
        "assert CliRunner().invoke(zdepth.cli.app, ['predict', '--help']).exit_code == 0\n"
        "heavy = [m for m in ('torch', 'torchvision', 'zdepth.engine', 'depth_anything_v2') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=50)
    assert out.returncode == 0, out.stderr


@pytest.mark.timeout(30)
def test_version(runner: CliRunner) -> None:
    from zdepth import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


# ----------------------------------------------------------------------------- broker and worker options


@pytest.mark.timeout(30)
def test_broker_options_map_onto_config(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, broker_configs: list) -> None:
    seen = broker_configs
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    result = runner.invoke(
        app,
        ["broker", "--clients", "tcp://*:7001", "--workers", "tcp://*:7002", "--key-file", str(key_file), "--heartbeat", "0.5", "--liveness", "4", "--max-queue", "7"],
    )
    assert result.exit_code == 0, result.output
    config = seen[-1]
    assert (config.clients, config.workers, config.key, config.max_queue) == ("tcp://*:7001", "tcp://*:7002", "from-file", 7)
    assert (config.heartbeat.interval_s, config.heartbeat.liveness) == (0.5, 4)

    # Everything from the environment, the key included.
    env = {"ZDEPTH_CLIENTS": "tcp://127.0.0.1:7101", "ZDEPTH_MAX_QUEUE": "9", "ZDEPTH_KEY": "from-env", "ZDEPTH_HEARTBEAT": "2"}
    result = runner.invoke(app, ["broker"], env=env)
    assert result.exit_code == 0, result.output
    config = seen[-1]
    assert (config.clients, config.workers, config.key, config.max_queue, config.heartbeat.interval_s) == (
        "tcp://127.0.0.1:7101", "tcp://*:5556", "from-env", 9, 2.0,
    )  # fmt: skip


@pytest.mark.timeout(30)
def test_broker_reports_a_port_in_use(runner: CliRunner) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["broker", "--clients", f"tcp://127.0.0.1:{free_port()}", "--workers", f"tcp://127.0.0.1:{port}"])
    assert result.exit_code == 4  # EXIT_ADDRESS: permanent, `serve` does not restart it
    assert f"error: cannot listen on --workers tcp://127.0.0.1:{port}: Address already in use (is another zdepth broker" in result.output


@pytest.mark.timeout(30)
def test_worker_options_map_onto_config(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, weights_dir: Path) -> None:
    seen: list[WorkerConfig] = []

    def fake_run_worker(config: WorkerConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr("zdepth.worker.run_worker", fake_run_worker)
    args = [
        "worker", "--broker", "tcp://gpu:5556", "-m", "vits", "--model", "vits-hypersim,vits-vkitti", "--device", "cpu",
        "--precision", "fp32", "--max-batch", "3", "--max-wait-ms", "5", "--compile", "--download", "--warmup", "64x96,32x32",
        "--cuda-graphs", "--gpu-decode",
    ]  # fmt: skip
    result = runner.invoke(app, args, env={"ZDEPTH_WEIGHTS_DIR": str(weights_dir), "ZDEPTH_KEY": "k"})
    assert result.exit_code == 0, result.output
    config = seen[-1]
    assert config.broker == "tcp://gpu:5556"
    assert config.models == ("vits", "vits-hypersim", "vits-vkitti")
    assert (config.device, config.precision, config.max_batch, config.max_wait_ms) == ("cpu", "fp32", 3, 5.0)
    assert (config.compile, config.download, config.weights_dir, config.key) == (True, True, str(weights_dir), "k")
    monkeypatch.setenv("ZDEPTH_WEIGHTS_DIR", str(weights_dir))
    assert config.warmup_sizes == ((64, 96), (32, 32))
    assert (config.cuda_graphs, config.gpu_decode) == (True, True)

    result = runner.invoke(app, ["worker", "--device", "cpu", "--warmup", "none"], env={"ZDEPTH_MODEL": "vits-hypersim", "ZDEPTH_MAX_BATCH": "2"})
    assert result.exit_code == 0, result.output
    assert seen[-1].models == ("vits-hypersim",) and seen[-1].max_batch == 2 and seen[-1].warmup_sizes == ()
    assert seen[-1].key is None
    assert (seen[-1].cuda_graphs, seen[-1].gpu_decode) == (None, False)  # None: on for CUDA devices
    result = runner.invoke(app, ["worker", "--device", "cpu"], env={"ZDEPTH_CUDA_GRAPHS": "1", "ZDEPTH_GPU_DECODE": "1"})
    assert (seen[-1].cuda_graphs, seen[-1].gpu_decode) == (True, True)


@pytest.mark.timeout(60)
def test_cuda_graphs_on_a_cpu_worker_is_a_config_error(runner: CliRunner, with_weights: Path) -> None:
    result = runner.invoke(app, ["worker", "--device", "cpu", "--cuda-graphs", "--warmup", "none", "--broker", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "CUDA graphs need a CUDA device" in result.output


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "vitx"], "unknown model 'vitx'"),
        (["--device", "gpu7"], "not a device"),
        (["--precision", "fp8"], "fp8"),
        (["--warmup", "big"], "HEIGHTxWIDTH"),
        (["--max-batch", "0"], "max-batch"),
    ],
)
def test_worker_refuses_bad_options(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str) -> None:
    monkeypatch.setattr("zdepth.worker.run_worker", lambda config: pytest.fail("must not start"))
    result = runner.invoke(app, ["worker", "--device", "cpu", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.timeout(60)
def test_worker_without_weights_exits_3_before_loading_anything(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["worker", "--device", "cpu", "-m", "vits-vkitti", "--weights-dir", str(tmp_path), "--broker", "tcp://127.0.0.1:9"])
    assert result.exit_code == 3, result.output  # EXIT_MISSING: serve does not restart it
    assert f"checkpoint for model 'vits-vkitti' not found: {tmp_path}/depth_anything_v2_metric_vkitti_vits.pth" in result.output
    assert "https://huggingface.co/depth-anything/Depth-Anything-V2-Metric-VKITTI-Small" in result.output


@pytest.mark.timeout(60)
def test_worker_on_a_gpu_this_machine_lacks_is_a_config_error(runner: CliRunner, with_weights: Path) -> None:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result = runner.invoke(app, ["worker", "--device", f"cuda:{count}", "--broker", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    expected = "CUDA is not available on this machine; use --device cpu" if not count else f"this machine has {count} GPU(s)"
    assert f"error: --device cuda:{count}: {expected}" in result.output


HTTP_STATUS_SERVER = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(int(sys.argv[2]))
        self.end_headers()
    do_GET = do_HEAD
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.mark.timeout(60)
def test_a_download_that_cannot_reach_the_hub_says_so_once_per_attempt(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    port = free_port()  # nothing listens: connection refused, as on a machine without a route to the hub
    argv = zdepth_argv("worker", "--download", "-m", "vits", "--weights-dir", str(tmp_path / "w"), "--device", "cpu")
    out = subprocess.run(argv, capture_output=True, text=True, env=child_env(HF_ENDPOINT=f"http://127.0.0.1:{port}"), timeout=50)
    assert out.returncode == 3, out.stderr
    attempts = [line for line in out.stderr.splitlines() if "cannot reach" in line and "(attempt " in line]
    assert [line.split("(attempt ")[1][:6] for line in attempts] == ["1 of 3", "2 of 3", "3 of 3"], out.stderr
    assert all(f"cannot reach 127.0.0.1:{port}" in line for line in attempts)
    assert f"The download failed: cannot reach the model hub at 127.0.0.1:{port} (Connection refused; 3 attempts)." in out.stderr
    assert "Retrying in" not in out.stderr and "huggingface_hub" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.timeout(60)
def test_a_hub_that_refuses_the_file_is_one_line_without_the_hub_library_noise(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    port = free_port()
    hub = subprocess.Popen([sys.executable, "-c", HTTP_STATUS_SERVER, str(port), "404"])
    try:
        argv = zdepth_argv("worker", "--download", "-m", "vits", "--weights-dir", str(tmp_path / "w"), "--device", "cpu")
        out = subprocess.run(argv, capture_output=True, text=True, env=child_env(HF_ENDPOINT=f"http://127.0.0.1:{port}"), timeout=50)
    finally:
        hub.kill()
        hub.wait()
    assert out.returncode == 3, out.stderr
    failed = [line for line in out.stderr.splitlines() if line.startswith("The download failed: ")]
    assert len(failed) == 1 and "Error: " in failed[0] and failed[0].endswith(".") and not failed[0].endswith(".."), out.stderr
    assert "cannot reach" not in out.stderr  # the hub answered
    assert "huggingface_hub" not in out.stderr and "Retrying in" not in out.stderr and "Traceback" not in out.stderr


WITHOUT_TORCH = "import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; from zdepth.cli import app; app(prog_name='zdepth')"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["serve", "worker", "predict"])
def test_without_torch_the_hint_names_both_install_commands(command: str, tmp_path: Path, images: Path) -> None:
    """torch hidden from a real process: exit 3 and an install line that works from a package index and from a clone."""
    args = {"serve": ["--device", "cpu", "--clients", f"tcp://127.0.0.1:{free_port()}"], "worker": ["--device", "cpu"], "predict": [str(images / "street.jpg"), "-o", str(tmp_path)]}
    out = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, command, *args[command]], capture_output=True, text=True, env=child_env(), timeout=50)
    assert out.returncode == 3, out.stderr
    assert out.stderr.strip() == (
        'error: running the model needs torch, which is not installed: pip install "zdepth[worker]" '
        '(in a clone of the repository: pip install -e ".[worker]")'
    )


@pytest.mark.timeout(30)
def test_log_level_configures_zdepth_logging(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, with_weights: Path) -> None:
    monkeypatch.setattr("zdepth.worker.run_worker", lambda config: 0)
    assert runner.invoke(app, ["worker", "--device", "cpu", "--log-level", "debug"]).exit_code == 0
    assert logging.getLogger("zdepth").level == logging.DEBUG
    assert runner.invoke(app, ["--log-level", "error", "worker", "--device", "cpu"]).exit_code == 0
    assert logging.getLogger("zdepth").level == logging.ERROR
    assert runner.invoke(app, ["worker", "--device", "cpu"], env={"ZDEPTH_LOG_LEVEL": "warning"}).exit_code == 0
    assert logging.getLogger("zdepth").level == logging.WARNING
    assert runner.invoke(app, ["worker", "--device", "cpu"]).exit_code == 0
    assert logging.getLogger("zdepth").level == logging.INFO  # the default, for every command
    assert runner.invoke(app, ["worker", "--device", "cpu", "--log-level", "WARNING"]).exit_code == 0
    assert logging.getLogger("zdepth").level == logging.WARNING
    bad = runner.invoke(app, ["worker", "--device", "cpu", "--log-level", "loud"])
    assert bad.exit_code == 2 and "loud" in bad.output


# ----------------------------------------------------------------------------- servers, profiles, keys


def test_resolve_server_addresses_and_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ZDEPTH_KEY", "ZDEPTH_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "lab.key").write_text("lab-secret")
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[lab]\naddress = "tcp://gpu-box:5555"\nkey_file = "lab.key"\nmodel = "vits-hypersim"\n')
    monkeypatch.setenv("ZDEPTH_CONFIG", str(profiles))
    assert resolve_server("tcp://a:1") == ("tcp://a:1", None, None)
    assert resolve_server("host:5555") == ("tcp://host:5555", None, None)
    assert resolve_server("lab") == ("tcp://gpu-box:5555", "lab-secret", "vits-hypersim")
    assert resolve_server("lab", key="override")[1] == "override"
    monkeypatch.setenv("ZDEPTH_KEY", "env-key")
    assert resolve_server("lab")[1] == "lab-secret"  # the profile's key beats the environment's
    assert resolve_server("tcp://a:1")[1] == "env-key"
    from zdepth import ConfigError

    with pytest.raises(ConfigError, match="available profiles: lab"):
        resolve_server("nope")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args, says",
    [
        (["health", "--server", "tcp://127.0.0.1"], "--server: 'tcp://127.0.0.1' has no port (did you mean tcp://127.0.0.1:5555?)"),
        (["health", "--server", "tcp//gpu-box:5555"], "--server: 'tcp//gpu-box:5555' is not an address (did you mean tcp://gpu-box:5555?)"),
        (["predict", "x.jpg", "--server", "http://gpu-box:8000"], "--server: 'http://gpu-box:8000': zdepth speaks ZeroMQ, not HTTP"),
        (["bench", "--server", "gpu-box:99999"], "--server: 'gpu-box:99999': port '99999' is not a number from 1 to 65535"),
        (["health", "--server", "gpu-box"], "no profile 'gpu-box'"),
        (["worker", "--device", "cpu", "--broker", "tcp://*:5556"], "--broker: 'tcp://*:5556' is an address to listen on"),
        (["broker", "--clients", "tcp://*"], "--clients: 'tcp://*' has no port"),
        (["broker", "--workers", "5556"], "--workers: '5556' has no port"),
        (["serve", "--workers", "udp://*:5556"], "--workers: 'udp://*:5556': unsupported scheme udp://"),
    ],
)
def test_address_options_refuse_bad_forms_in_one_line(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, args: list[str], says: str) -> None:
    monkeypatch.setattr("zdepth.worker.run_worker", lambda config: pytest.fail("must not start"))
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert says in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.timeout(30)
def test_address_options_accept_every_form(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, with_weights: Path) -> None:
    seen: list[WorkerConfig] = []
    monkeypatch.setattr("zdepth.worker.run_worker", lambda config: seen.append(config) or 0)
    for given, endpoint in [("gpu:5556", "tcp://gpu:5556"), ("TCP://gpu:5556", "tcp://gpu:5556"), (f"ipc://{tmp_path}/w", f"ipc://{tmp_path}/w")]:
        result = runner.invoke(app, ["worker", "--device", "cpu", "--broker", given])
        assert result.exit_code == 0, result.output
        assert seen[-1].broker == endpoint


@pytest.mark.timeout(30)
def test_unknown_profile_is_a_clear_error(runner: CliRunner, tmp_path: Path) -> None:
    profiles = tmp_path / "p.toml"
    profiles.write_text('[lab]\naddress = "tcp://gpu-box:5555"\n')
    result = runner.invoke(app, ["health", "--server", "nope"], env={"ZDEPTH_CONFIG": str(profiles)})
    assert result.exit_code == 2
    assert "no profile 'nope'" in result.output and "lab" in result.output and str(profiles) in result.output
    profiles.write_text("[lab\n")
    result = runner.invoke(app, ["health", "--server", "lab"], env={"ZDEPTH_CONFIG": str(profiles)})
    assert result.exit_code == 2 and "not valid TOML" in result.output and "line 1" in result.output


@pytest.fixture
def lone_broker(tmp_path: Path):
    """A real broker process (no worker) with key "right", and its client address."""
    from procs import spawn

    address = f"tcp://127.0.0.1:{free_port()}"
    argv = zdepth_argv("broker", "--clients", address, "--workers", f"tcp://127.0.0.1:{free_port()}")
    broker = spawn(argv, tmp_path / "broker.log", child_env(ZDEPTH_KEY="right"))
    try:
        yield address
    finally:
        broker.stop()


@pytest.mark.timeout(60)
def test_settings_come_from_the_command_line_then_the_profile_then_the_environment(runner: CliRunner, lone_broker: str, tmp_path: Path) -> None:
    (tmp_path / "lab.key").write_text("right\n")
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'[lab]\naddress = "{lone_broker}"\nkey_file = "lab.key"\ntimeout = 5.0\n')
    env = {"ZDEPTH_CONFIG": str(profiles), "ZDEPTH_KEY": "another-brokers-key", "ZDEPTH_TIMEOUT": "0.001"}
    # The profile's key and timeout beat the environment's (a 1 ms timeout would fail).
    result = runner.invoke(app, ["health", "--server", "lab", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["server"] == lone_broker
    # The command line beats the profile.
    result = runner.invoke(app, ["health", "--server", "lab", "--key", "wrong"], env=env)
    assert result.exit_code == 1 and "key" in result.output, result.output
    # Without a profile, the environment is what there is.
    result = runner.invoke(app, ["health", "--timeout", "10"], env={**env, "ZDEPTH_SERVER": lone_broker, "ZDEPTH_KEY": "right"})
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["health", "--timeout", "10"], env={**env, "ZDEPTH_SERVER": lone_broker})
    assert result.exit_code == 1, result.output


@pytest.mark.timeout(30)
def test_health_without_a_broker_fails_fast(runner: CliRunner) -> None:
    result = runner.invoke(app, ["health", "--server", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.3"])
    assert result.exit_code == 1
    assert "cannot reach the broker at tcp://127.0.0.1:" in result.output


def test_format_health_table() -> None:
    info = {
        "version": "0.1.0", "uptime_s": 3725, "queued_total": 2, "queue_limit": 1024, "in_flight": 3, "models": ["vits"],
        "workers": [
            {"name": "box:1:cuda:0", "host": "box", "device": "cuda:0", "precision": "fp16", "models": ["vits"], "in_flight": 3,
             "capacity": 16, "served": 42, "failed": 1, "uptime_s": 65, "draining": False},
        ],
    }  # fmt: skip
    text = format_health("tcp://box:5555", info)
    assert "up 1h02m" in text and "queued 2/1024" in text
    header, row = text.splitlines()[-2:]
    assert header.split() == ["WORKER", "HOST", "DEVICE", "PRECISION", "MODELS", "LOAD", "SERVED", "FAILED", "UPTIME", "STATE"]
    assert row.split() == ["box:1:cuda:0", "box", "cuda:0", "fp16", "vits", "3/16", "42", "1", "1m05s", "ready"]
    assert "no workers connected" in format_health("tcp://box:5555", {**info, "workers": []})


# ----------------------------------------------------------------------------- predict, in-process


@pytest.mark.timeout(240)
def test_predict_in_process_writes_every_format(runner: CliRunner, images: Path, weights_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [
        "predict", str(images / "street.jpg"), "--model", "vits-hypersim", "--input-size", "28", "--out", str(out),
        "--format", "npy,png16", "-f", "color", "-f", "ply", "--fx", str(FX), "--fy", str(FY), "--cx", str(CX), "--cy", str(CY),
        "--weights-dir", str(weights_dir), "--device", "cpu",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 image(s)" in result.output and "4 file(s) written" in result.output and "ms per image" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["street.color.png", "street.depth.png", "street.npy", "street.ply"]

    depth = np.load(out / "street.npy")
    assert depth.dtype == np.float32 and depth.shape == (64, 96)
    assert np.isfinite(depth).all() and 0 < depth.min() <= depth.max() <= 20.0  # hypersim: sigmoid x 20 m

    png16 = cv2.imread(str(out / "street.depth.png"), cv2.IMREAD_UNCHANGED)
    assert png16.dtype == np.uint16 and png16.shape == (64, 96)
    np.testing.assert_array_equal(png16, np.clip(np.rint(depth * 1000.0), 0, 65535).astype(np.uint16))

    color = cv2.imread(str(out / "street.color.png"), cv2.IMREAD_UNCHANGED)
    assert color.dtype == np.uint8 and color.shape == (64, 96, 3)

    vertices = parse_ply(out / "street.ply")
    assert len(vertices) == 64 * 96
    assert vertices.dtype.names == ("x", "y", "z", "red", "green", "blue")
    v, u = np.mgrid[0:64, 0:96]
    z = depth.ravel()
    np.testing.assert_allclose(vertices["z"], z, rtol=1e-6)
    np.testing.assert_allclose(vertices["x"], (u.ravel() - CX) * z / FX, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vertices["y"], (v.ravel() - CY) * z / FY, rtol=1e-5, atol=1e-6)
    bgr = cv2.imread(str(images / "street.jpg"))
    np.testing.assert_array_equal(np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1), bgr[..., ::-1].reshape(-1, 3))
    points, _ = read_ply(out / "street.ply")  # and plyfile, an independent reader, agrees
    np.testing.assert_array_equal(points[:, 2], vertices["z"])


@pytest.mark.timeout(240)
def test_predict_folders_globs_videos_and_failures(runner: CliRunner, images: Path, weights_dir: Path, tmp_path: Path) -> None:
    small_video(tmp_path / "clip.avi", frames=12)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    out = tmp_path / "out"
    args = [
        "predict", str(images), str(tmp_path / "*.avi"), str(tmp_path / "broken.jpg"), str(tmp_path / "missing.png"),
        "--every", "5", "--input-size", "28", "--out", str(out), "--json", "--device", "cpu",
    ]  # fmt: skip
    result = runner.invoke(app, args, env={"ZDEPTH_WEIGHTS_DIR": str(weights_dir)})
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["frames"] == 2 + 3  # two photos; frames 0, 5 and 10 of the video
    assert summary["written"] == 5 * 2  # default formats: npy and color
    reasons = {f["input"]: f["reason"] for f in summary["failures"]}
    assert set(reasons) == {str(tmp_path / "broken.jpg"), str(tmp_path / "missing.png")}
    assert "no such file" in reasons[str(tmp_path / "missing.png")]
    assert "bad_request" in reasons[str(tmp_path / "broken.jpg")]
    assert summary["ms_per_frame"] > 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"{stem}.{ext}" for stem in ("street", "room", "clip_000000", "clip_000005", "clip_000010") for ext in ("npy", "color.png")
    )
    relative = np.load(out / "clip_000005.npy")
    assert relative.dtype == np.float32 and relative.shape == (64, 96)

    # The text summary names the failures and their reasons.
    result = runner.invoke(app, ["predict", str(tmp_path / "missing.png"), "--out", str(out)], env={"ZDEPTH_WEIGHTS_DIR": str(weights_dir)})
    assert result.exit_code == 1
    assert "1 failed" in result.output and "missing.png: no such file or folder" in result.output


@pytest.mark.timeout(240)
def test_predict_options_from_environment(runner: CliRunner, images: Path, weights_dir: Path, tmp_path: Path) -> None:
    env = {"ZDEPTH_WEIGHTS_DIR": str(weights_dir), "ZDEPTH_FORMAT": "png16,npy", "ZDEPTH_INPUT_SIZE": "28", "ZDEPTH_OUT": str(tmp_path / "o"), "ZDEPTH_DEVICE": "cpu"}
    result = runner.invoke(app, ["predict", str(images / "room.png")], env=env)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["room.depth.png", "room.npy"]
    png16 = cv2.imread(str(tmp_path / "o" / "room.depth.png"), cv2.IMREAD_UNCHANGED)
    depth = np.load(tmp_path / "o" / "room.npy")
    assert png16.dtype == np.uint16 and png16.shape == depth.shape
    span = depth.max() - depth.min()  # relative depth: scaled per image onto 0..65535
    expected = np.rint((depth - depth.min()) / span * 65535) if span > 0 else np.zeros_like(depth)
    np.testing.assert_allclose(png16, expected, atol=1)


def test_png16_and_colour_scaling() -> None:
    from zdepth.client.outputs import colorize, depth_to_png16

    ramp = np.linspace(1.0, 5.0, 12, dtype=np.float32).reshape(3, 4)
    relative = depth_to_png16(ramp, metric=False)
    assert relative.dtype == np.uint16 and relative.min() == 0 and relative.max() == 65535 and relative[0, 0] == 0
    metric = depth_to_png16(ramp, metric=True, depth_scale=1000)
    np.testing.assert_array_equal(metric, np.rint(ramp * 1000).astype(np.uint16))
    assert depth_to_png16(np.array([[100.0, np.nan]], np.float32), metric=True).tolist() == [[65535, 0]]  # clipped; NaN -> 0
    # Near is bright in both: the largest relative value and the smallest metric one.
    gray_rel = colorize(ramp, metric=False, colormap="bone")[..., 0]
    gray_met = colorize(ramp, metric=True, colormap="bone")[..., 0]
    assert gray_rel[2, 3] > gray_rel[0, 0] and gray_met[0, 0] > gray_met[2, 3]
    assert colorize(np.zeros((2, 2), np.float32), metric=False).shape == (2, 2, 3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args, message",
    [
        (["-f", "ply", "-m", "vits-hypersim"], "needs camera intrinsics"),
        (["-f", "ply", "--fx", "1", "--fy", "1", "--cx", "1", "--cy", "1"], "needs metric depth"),
        (["--fx", "100"], "all four of --fx --fy --cx --cy"),
        (["-f", "npy,jpeg"], "unknown output format 'jpeg'"),
        (["-m", "vitq"], "unknown model 'vitq'"),
        (["--max-depth", "5"], "metric models only"),
        (["--colormap", "rainbowish"], "'rainbowish' is not one of"),
    ],
)
def test_predict_refuses_bad_options(runner: CliRunner, images: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["predict", str(images / "street.jpg"), "-o", str(tmp_path / "o"), *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(120)
def test_predict_warns_when_the_principal_point_lies_outside_the_image(runner: CliRunner, images: Path, weights_dir: Path, tmp_path: Path) -> None:
    base = ["predict", str(images), "-m", "vits-hypersim", "-f", "ply", "--input-size", "28", "--device", "cpu", "--weights-dir", str(weights_dir)]
    # A 12-megapixel camera's intrinsics on 96x64 images: written, but warned about once per image size.
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "a"), "--fx", "1982.43", "--fy", "1978.03", "--cx", "2061.59", "--cy", "1546.35"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "principal point" in line]
    assert len(warnings) == 1, result.output
    assert "(--cx 2061.59, --cy 1546.35) lies outside the 96x64 image" in warnings[0] and "another resolution" in warnings[0]
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "b"), "--fx", str(FX), "--fy", str(FY), "--cx", str(CX), "--cy", str(CY)])
    assert result.exit_code == 0, result.output
    assert "principal point" not in result.output


@pytest.mark.timeout(60)
def test_predict_intrinsics_file(runner: CliRunner, images: Path, weights_dir: Path, tmp_path: Path) -> None:
    k = tmp_path / "K.txt"
    k.write_text(f"{FX} 0 {CX}\n0 {FY} {CY}\n0 0 1\n")
    args = ["predict", str(images / "street.jpg"), "-m", "vits-vkitti", "-f", "ply", "--intrinsics", str(k), "--input-size", "28", "-o", str(tmp_path / "o"), "--max-depth", "5"]
    result = runner.invoke(app, args, env={"ZDEPTH_WEIGHTS_DIR": str(weights_dir), "ZDEPTH_DEVICE": "cpu"})
    assert result.exit_code == 0, result.output
    vertices = parse_ply(tmp_path / "o" / "street.ply")
    assert len(vertices) == 64 * 96 and 0 < vertices["z"].max() <= 5.0


@pytest.mark.timeout(60)
def test_predict_in_process_without_weights(runner: CliRunner, images: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["predict", str(images / "street.jpg"), "-o", str(tmp_path / "o"), "--weights-dir", str(tmp_path / "empty"), "--device", "cpu"])
    assert result.exit_code == 3  # EXIT_MISSING
    assert "depth_anything_v2_vits.pth" in result.output and "pass --download;" in result.output
    assert "download=True" not in result.output  # the CLI speaks of options, not of Python arguments


# ----------------------------------------------------------------------------- against a live server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path):
    server = start_live_server(tmp_path_factory.mktemp("live"), weights_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_health_table_and_json(runner: CliRunner, live) -> None:
    result = runner.invoke(app, ["health", "--server", live.client_address], env={"ZDEPTH_KEY": live.key})
    assert result.exit_code == 0, result.output
    assert "models: vits, vits-hypersim" in result.output
    row = result.output.splitlines()[-1].split()
    assert row[2:5] == ["cpu", "fp32", "vits,vits-hypersim"] and row[-1] == "ready"

    result = runner.invoke(app, ["health", "--server", live.client_address, "--json"], env={"ZDEPTH_KEY": live.key})
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["server"] == live.client_address and info["models"] == ["vits", "vits-hypersim"]
    (worker,) = info["workers"]
    assert worker["device"] == "cpu" and worker["pid"] == live.procs[1].pid and worker["uptime_s"] > 0

    result = runner.invoke(app, ["health", "--server", live.client_address], env={"ZDEPTH_KEY": "wrong"})
    assert result.exit_code == 1 and "refused the key" in result.output


@pytest.mark.timeout(120)
def test_bench_against_live_server(runner: CliRunner, live) -> None:
    args = ["bench", "--server", live.client_address, "--clients", "2", "--seconds", "1.5", "--size", "48x64", "--input-size", "28", "--json"]
    result = runner.invoke(app, args, env={"ZDEPTH_KEY": live.key})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["frames"] > 0 and report["errors"] == 0 and report["fps"] > 0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert report["clients"] == 2 and report["size"] == "48x64"

    result = runner.invoke(app, [*args[:-1], "--in-flight", "2", "-m", "vits-hypersim"], env={"ZDEPTH_KEY": live.key})
    assert result.exit_code == 0, result.output
    assert "frames/s" in result.output and "p50" in result.output and "p99" in result.output and "errors      0" in result.output


@pytest.mark.timeout(120)
def test_bench_with_real_images_counts_errors(runner: CliRunner, live, images: Path) -> None:
    args = ["bench", "--server", live.client_address, "-c", "1", "-t", "0.5", "-i", str(images / "street.jpg"), "--input-size", "28", "--json"]
    result = runner.invoke(app, [*args, "-m", "vitb"], env={"ZDEPTH_KEY": live.key})  # a model nobody serves
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["frames"] == 0 and report["errors"] > 0 and set(report["errors_by_code"]) == {"unknown_model"}
    assert report["size"] == "64x96"
    bad = runner.invoke(app, [*args, "--input-size", "30"], env={"ZDEPTH_KEY": live.key, "COLUMNS": "200"})
    assert bad.exit_code == 2 and "multiple of 14" in bad.output


@pytest.mark.timeout(180)
def test_predict_against_live_server_matches_in_process(runner: CliRunner, live, images: Path, weights_dir: Path, tmp_path: Path) -> None:
    # A real `zdepth predict` process, the key from the environment only.
    remote = tmp_path / "remote"
    argv = zdepth_argv(
        "predict", str(images), "--server", live.client_address, "-m", "vits-hypersim", "--input-size", "28",
        "-f", "npy,ply", "--fx", str(FX), "--fy", str(FY), "--cx", str(CX), "--cy", str(CY), "-o", str(remote),
    )  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, env=child_env(ZDEPTH_KEY=live.key), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 image(s)" in out.stdout
    assert sorted(p.name for p in remote.iterdir()) == ["room.npy", "room.ply", "street.npy", "street.ply"]

    local = tmp_path / "local"
    result = runner.invoke(
        app, ["predict", str(images), "-m", "vits-hypersim", "--input-size", "28", "-f", "npy", "-o", str(local), "--device", "cpu"],
        env={"ZDEPTH_WEIGHTS_DIR": str(weights_dir)},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in ("street.npy", "room.npy"):
        np.testing.assert_allclose(np.load(remote / name), np.load(local / name), rtol=1e-4, atol=1e-4)
    assert len(parse_ply(remote / "street.ply")) == 64 * 96


@pytest.mark.timeout(120)
def test_predict_with_a_profile(runner: CliRunner, live, images: Path, tmp_path: Path) -> None:
    (tmp_path / "lab.key").write_text(live.key + "\n")
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'[lab]\naddress = "{live.client_address}"\nkey_file = "lab.key"\nmodel = "vits-hypersim"\n')
    result = runner.invoke(
        app, ["predict", str(images / "room.png"), "--server", "lab", "--input-size", "28", "-o", str(tmp_path / "o"), "--max-depth", "3"],
        env={"ZDEPTH_CONFIG": str(profiles)},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    depth = np.load(tmp_path / "o" / "room.npy")
    assert depth.shape == (64, 96) and 0 < depth.max() <= 3.0  # the profile's metric model, max_depth applied

    result = runner.invoke(app, ["health", "-s", "lab", "--json"], env={"ZDEPTH_CONFIG": str(profiles)})
    assert result.exit_code == 0 and json.loads(result.stdout)["server"] == live.client_address


# ----------------------------------------------------------------------------- predict: images by URL


class _ImageHost:
    """A local HTTP server (127.0.0.1) serving a folder, recording every path asked for."""

    def __init__(self, folder: Path) -> None:
        import functools
        import http.server
        import threading

        self.paths: list[str] = []
        host = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                host.paths.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def image_host(images: Path):
    host = _ImageHost(images)
    try:
        yield host
    finally:
        host.close()


@pytest.mark.timeout(180)
def test_predict_images_by_url_against_a_server(live, images: Path, image_host: _ImageHost, tmp_path: Path) -> None:
    # Real `zdepth predict` processes: a URL (with a query, which names no file), a 404, a scheme that is never fetched,
    # and, for comparison, the same photo as a file.
    options = [
        "--server", live.client_address, "-m", "vits-hypersim", "--input-size", "28", "-f", "npy,ply",
        "--fx", str(FX), "--fy", str(FY), "--cx", str(CX), "--cy", str(CY), "--json",
    ]  # fmt: skip
    urls = [f"{image_host.url}/street.jpg?token=s3cret", f"{image_host.url}/missing.jpg", "ftp://127.0.0.1/street.jpg"]
    by_url = subprocess.run(
        zdepth_argv("predict", *urls, *options, "-o", str(tmp_path / "url")), capture_output=True, text=True, env=child_env(ZDEPTH_KEY=live.key), timeout=120
    )
    assert by_url.returncode == 1, by_url.stdout + by_url.stderr  # two of the three inputs fail
    summary = json.loads(by_url.stdout)
    assert summary["frames"] == 1 and summary["written"] == 2
    reasons = {f["input"]: f["reason"] for f in summary["failures"]}
    assert set(reasons) == {f"{image_host.url}/missing.jpg", "ftp://127.0.0.1/street.jpg"}, reasons
    assert "HTTP 404" in reasons[f"{image_host.url}/missing.jpg"]
    assert "only http:// and https://" in reasons["ftp://127.0.0.1/street.jpg"]
    assert "s3cret" not in by_url.stdout + by_url.stderr  # a URL's query may hold a token: never shown
    assert sorted(p.name for p in (tmp_path / "url").iterdir()) == ["street.npy", "street.ply"]
    # Fetched once, here (the point cloud's colours come from the same download), never by the server.
    assert image_host.paths.count("/street.jpg?token=s3cret") == 1 and len(image_host.paths) == 2, image_host.paths

    by_file = subprocess.run(
        zdepth_argv("predict", str(images / "street.jpg"), *options, "-o", str(tmp_path / "file")),
        capture_output=True, text=True, env=child_env(ZDEPTH_KEY=live.key), timeout=120,
    )  # fmt: skip
    assert by_file.returncode == 0, by_file.stdout + by_file.stderr
    np.testing.assert_allclose(np.load(tmp_path / "url" / "street.npy"), np.load(tmp_path / "file" / "street.npy"), rtol=1e-5, atol=1e-6)
    from_url, from_file = parse_ply(tmp_path / "url" / "street.ply"), parse_ply(tmp_path / "file" / "street.ply")
    assert len(from_url) == 64 * 96
    for channel in ("red", "green", "blue"):
        np.testing.assert_array_equal(from_url[channel], from_file[channel])


@pytest.mark.timeout(120)
def test_predict_image_by_url_in_process_and_names(runner: CliRunner, image_host: _ImageHost, weights_dir: Path, tmp_path: Path) -> None:
    from zdepth.client.inputs import expand_inputs, url_name

    assert url_name("https://example.org/a/b/cat.photo.jpg?w=640#x") == "cat.photo.jpg"
    assert url_name("https://example.org/") == "example.org"
    assert url_name("https://example.org/dir/it%27s%20here.png") == "it_s_here.png"
    sources, failures = expand_inputs(["https://example.org/x.jpg", "https://example.org/x.jpg", "https://example.org/clip.mp4"])
    assert [s.url for s in sources] == ["https://example.org/x.jpg"]  # taken once
    assert [f.reason for f in failures] == ["videos are not fetched by URL; download the file and give its path"]

    result = runner.invoke(
        app,
        ["predict", f"{image_host.url}/room.png", "--input-size", "28", "-f", "npy", "-o", str(tmp_path / "o"), "--device", "cpu"],
        env={"ZDEPTH_WEIGHTS_DIR": str(weights_dir)},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    depth = np.load(tmp_path / "o" / "room.npy")
    assert depth.shape == (64, 96) and np.isfinite(depth).all()
    assert image_host.paths == ["/room.png"]
