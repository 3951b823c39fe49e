"""CurveZMQ from the command line: `zdepth keygen`, the broker's allow-list, workers, clients and profiles.

A real broker and two real CPU workers (``python -m zdepth ...`` subprocesses,
tiny settings: --warmup none, input size 28): one worker holds an allowed
certificate, the other a certificate the broker does not know. Clients and
the allowed worker reach the broker through TCP relays that record every
byte both ways, so the tests can show what crosses the wire.
"""

from __future__ import annotations

import json
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zmq.auth
from typer.testing import CliRunner

from procs import Proc, Relay, child_env, free_port, small_image, spawn, zdepth_argv
from zdepth import Client, ConfigError
from zdepth.cli import app
from zdepth.errors import DeadlineExceeded, ZdepthError
from zdepth.protocol.curve import CurveClient

KEY = "cli-curve-shared-key-7f3a"
MARKER = b"PLAINTEXT-PIXELS"  # 16 bytes; the test image is this, repeated
HEARTBEAT = ["--heartbeat", "0.5", "--liveness", "3"]


@dataclass
class Certs:
    root: Path
    allow: Path

    def secret(self, name: str) -> Path:
        return next(self.root.glob(f"*/{name}.key_secret"))

    def public(self, name: str) -> Path:
        return next(self.root.glob(f"*/{name}.key"))

    def client(self, name: str) -> CurveClient:
        return CurveClient(self.secret(name), self.public("broker"))


@dataclass
class LiveCurveServer:
    certs: Certs
    client_address: str  # the broker itself
    client_relay: Relay
    worker_relay: Relay
    procs: dict[str, Proc] = field(default_factory=dict)

    def stop(self) -> None:
        for name in ("rogue", "worker", "broker"):
            if name in self.procs:
                self.procs[name].stop()
        self.client_relay.close()
        self.worker_relay.close()


def keygen(name: str, out: Path) -> str:
    result = CliRunner().invoke(app, ["keygen", name, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """broker; robot and gpu (allowed); stranger and rogue-gpu (not allowed). Written by `zdepth keygen`."""
    root = tmp_path_factory.mktemp("curve")
    for name, folder in (("broker", "broker"), ("robot", "peers"), ("gpu", "peers"), ("stranger", "strangers"), ("rogue-gpu", "strangers")):
        keygen(name, root / folder)
    allow = root / "allow"
    allow.mkdir()
    for name in ("robot", "gpu"):
        shutil.copy(root / "peers" / f"{name}.key", allow)
    return Certs(root, allow)


def wait_for_workers(address: str, curve: CurveClient, procs: list[Proc], count: int = 1, timeout: float = 40.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.popen.poll() is None, f"{proc.popen.args} exited:\n{proc.tail()}"
        try:
            with Client(address, key=KEY, timeout=1.0, retries=0, curve=curve) as client:
                last = client.health()
            if len(last["workers"]) >= count:
                return last
        except DeadlineExceeded as exc:
            last = exc
        time.sleep(0.2)
    logs = "\n\n".join(f"--- {p.popen.args[3:5]} ---\n{p.tail()}" for p in procs)
    raise AssertionError(f"no worker at {address} after {timeout} s (last: {last!r})\n{logs}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, certs: Certs, weights_dir: Path):
    tmp = tmp_path_factory.mktemp("curve-procs")
    client_port, worker_port = free_port(), free_port()
    live = LiveCurveServer(certs, f"tcp://127.0.0.1:{client_port}", Relay(client_port), Relay(worker_port))
    common = ["--device", "cpu", "--model", "vits", "--warmup", "none", "--max-batch", "2", *HEARTBEAT, "--log-level", "debug"]
    try:
        # Broker: the certificate from an option, the allow folder from the environment.
        live.procs["broker"] = spawn(
            zdepth_argv(
                "broker", "--clients", live.client_address, "--workers", f"tcp://127.0.0.1:{worker_port}",
                "--curve-secret", str(certs.secret("broker")), *HEARTBEAT, "--log-level", "debug",
            ),
            tmp / "broker.log",
            child_env(ZDEPTH_KEY=KEY, ZDEPTH_CURVE_ALLOW=str(certs.allow)),
        )  # fmt: skip
        # The allowed worker, through the recording relay; certificates from options.
        live.procs["worker"] = spawn(
            zdepth_argv(
                "worker", "--broker", live.worker_relay.address, *common,
                "--curve-secret", str(certs.secret("gpu")), "--curve-server-key", str(certs.public("broker")),
            ),
            tmp / "worker.log",
            child_env(weights_dir, ZDEPTH_KEY=KEY),
        )  # fmt: skip
        # A worker that knows the shared key and the broker's public key, but holds a certificate not in the allow folder
        # (from the environment, ZDEPTH_CURVE_SECRET / ZDEPTH_CURVE_SERVER_KEY).
        live.procs["rogue"] = spawn(
            zdepth_argv("worker", "--broker", f"tcp://127.0.0.1:{worker_port}", *common),
            tmp / "rogue.log",
            child_env(weights_dir, ZDEPTH_KEY=KEY, ZDEPTH_CURVE_SECRET=str(certs.secret("rogue-gpu")), ZDEPTH_CURVE_SERVER_KEY=str(certs.public("broker"))),
        )
        wait_for_workers(live.client_address, certs.client("robot"), [live.procs["broker"], live.procs["worker"]])  # the rogue exits once refused
        yield live
    finally:
        live.stop()


def marked_image(height: int = 32, width: int = 48) -> np.ndarray:
    raw = (MARKER * (height * width * 3 // len(MARKER) + 1))[: height * width * 3]
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3).copy()


# ----------------------------------------------------------------------------- keygen (no processes)


@pytest.mark.timeout(30)
def test_keygen_writes_usable_certificates_with_a_private_secret(runner: CliRunner, tmp_path: Path) -> None:
    output = keygen("robot-3", tmp_path / "certs")
    public, secret = tmp_path / "certs" / "robot-3.key", tmp_path / "certs" / "robot-3.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    public_key, no_secret = zmq.auth.load_certificate(public)
    same_public, secret_key = zmq.auth.load_certificate(secret)
    assert no_secret is None and secret_key and len(public_key) == 40 and same_public == public_key
    # It says what goes where.
    assert str(public) in output and str(secret) in output
    assert "--curve-allow" in output and "--curve-server-key" in output and "--curve-secret" in output

    again = runner.invoke(app, ["keygen", "robot-3", "--out", str(tmp_path / "certs")])
    assert again.exit_code == 2 and "already exists" in again.output
    assert zmq.auth.load_certificate(public)[0] == public_key  # untouched
    assert runner.invoke(app, ["keygen", "robot-3", "--out", str(tmp_path / "certs"), "--force"]).exit_code == 0
    assert zmq.auth.load_certificate(public)[0] != public_key
    bad = runner.invoke(app, ["keygen", "../escape", "--out", str(tmp_path / "certs")])
    assert bad.exit_code == 2 and "not a certificate name" in bad.output


@pytest.mark.timeout(30)
def test_keygen_default_folder_honours_xdg(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["keygen", "laptop"], env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert result.exit_code == 0, result.output
    folder = tmp_path / "xdg" / "zdepth" / "curve"
    assert (folder / "laptop.key").is_file() and stat.S_IMODE((folder / "laptop.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# ----------------------------------------------------------------------------- option errors (no processes)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args, message",
    [
        (["health", "--curve-secret", "{robot}"], "got only --curve-secret"),
        (["health", "--curve-server-key", "{broker_pub}"], "got only --curve-server-key"),
        (["bench", "--curve-secret", "{robot}"], "got only --curve-secret"),
        (["predict", "x.png", "--server", "tcp://127.0.0.1:1", "--curve-server-key", "{broker_pub}"], "got only --curve-server-key"),
        (["worker", "--device", "cpu", "--curve-secret", "{robot}"], "got only --curve-secret"),
        (["broker", "--curve-allow", "{allow}"], "--curve-allow needs --curve-secret"),
        (["broker", "--curve-secret", "{broker_pub}"], "is a public certificate"),
        (["health", "--curve-secret", "{robot}", "--curve-server-key", "{missing}"], "cannot read CurveZMQ certificate"),
    ],
)
def test_half_a_pair_or_a_wrong_file_is_exit_2(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, certs: Certs, args: list[str], message: str) -> None:
    monkeypatch.setattr("zdepth.worker.run_worker", lambda config: pytest.fail("must not start"))
    paths = {"robot": certs.secret("robot"), "broker_pub": certs.public("broker"), "allow": certs.allow, "missing": certs.root / "missing.key"}
    result = runner.invoke(app, [arg.format(**paths) for arg in args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.timeout(30)
def test_env_vars_complete_a_pair(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, certs: Certs, weights_dir: Path) -> None:
    seen = []
    monkeypatch.setattr("zdepth.worker.run_worker", lambda config: seen.append(config) or 0)
    env = {"ZDEPTH_CURVE_SECRET": str(certs.secret("gpu")), "ZDEPTH_CURVE_SERVER_KEY": str(certs.public("broker")), "ZDEPTH_WEIGHTS_DIR": str(weights_dir)}
    result = runner.invoke(app, ["worker", "--device", "cpu"], env=env)
    assert result.exit_code == 0, result.output
    assert seen[-1].curve == CurveClient(certs.secret("gpu"), certs.public("broker"))


@pytest.mark.timeout(30)
def test_serve_passes_certificates_to_its_broker_and_workers(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, certs: Certs, tmp_path: Path, weights_dir: Path) -> None:
    specs = []

    class FakeSupervisor:
        def __init__(self, children, **kwargs) -> None:
            specs.extend(children)

        def run(self) -> int:
            return 0

        def stop(self) -> None:
            pass

    monkeypatch.setattr("zdepth.supervisor.Supervisor", FakeSupervisor)
    monkeypatch.setenv("ZDEPTH_WEIGHTS_DIR", str(weights_dir))
    args = ["serve", "--device", "cpu", "--curve-secret", str(certs.secret("broker")), "--curve-allow", str(certs.allow)]
    # Its workers use the broker's own certificate by default, which this allow folder does not hold.
    refused = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and "broker.key" in refused.output and "--curve-worker-secret" in refused.output
    assert not specs

    result = runner.invoke(app, [*args, "--curve-worker-secret", str(certs.secret("gpu"))], env={"ZDEPTH_CURVE_SERVER_KEY": "/stray"})
    assert result.exit_code == 0, result.output
    broker_spec, worker_spec = specs
    reported = {"broker": {"clients": "tcp://0.0.0.0:5555", "workers": "tcp://0.0.0.0:5556"}}
    broker_argv, worker_argv = broker_spec.argv(reported), worker_spec.argv(reported)
    assert broker_argv[broker_argv.index("--curve-secret") + 1] == str(certs.secret("broker"))
    assert broker_argv[broker_argv.index("--curve-allow") + 1] == str(certs.allow)
    assert worker_argv[worker_argv.index("--curve-secret") + 1] == str(certs.secret("gpu"))
    assert worker_argv[worker_argv.index("--curve-server-key") + 1] == str(certs.public("broker"))
    # Children take their certificates from the command line only, never from a stray environment.
    assert worker_spec.env["ZDEPTH_CURVE_SERVER_KEY"] is None and worker_spec.env["ZDEPTH_CURVE_SECRET"] is None

    # Allowing the broker's public key lets the workers share its certificate.
    allow = tmp_path / "allow"
    shutil.copytree(certs.allow, allow)
    shutil.copy(certs.public("broker"), allow)
    specs.clear()
    result = runner.invoke(app, ["serve", "--device", "cpu", "--curve-secret", str(certs.secret("broker")), "--curve-allow", str(allow)])
    assert result.exit_code == 0, result.output
    worker_argv = specs[1].argv(reported)
    assert worker_argv[worker_argv.index("--curve-secret") + 1] == str(certs.secret("broker"))


# ----------------------------------------------------------------------------- against real processes


@pytest.mark.timeout(90)
def test_allowed_client_gets_depth(runner: CliRunner, server: LiveCurveServer, tmp_path: Path) -> None:
    with Client(server.client_address, key=KEY, timeout=10, retries=0, curve=server.certs.client("robot")) as client:
        result = client.relative_depth(marked_image(), input_size=28)
    assert result.depth.shape == (32, 48) and np.isfinite(result.depth).all()

    image = small_image(tmp_path / "room.png", "demo04.jpg")
    args = [
        "predict", str(image), "--server", server.client_address, "--input-size", "28", "-f", "npy", "-o", str(tmp_path / "out"),
        "--curve-secret", str(server.certs.secret("robot")), "--curve-server-key", str(server.certs.public("broker")),
    ]  # fmt: skip
    result = runner.invoke(app, args, env={"ZDEPTH_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "out" / "room.npy").shape == (64, 96)


@pytest.mark.timeout(60)
def test_client_without_an_allowed_key_gets_no_connection(runner: CliRunner, server: LiveCurveServer) -> None:
    for curve in (server.certs.client("stranger"), None):  # a stranger's certificate, and no encryption at all
        started = time.monotonic()
        with pytest.raises(ZdepthError) as refused, Client(server.client_address, key=KEY, timeout=1, retries=0, curve=curve) as client:
            client.health()
        assert time.monotonic() - started < 3
        assert "CurveZMQ" in str(refused.value), refused.value  # says why, in words an operator can act on

    args = ["health", "-s", server.client_address, "--timeout", "1", "--curve-secret", str(server.certs.secret("stranger"))]
    result = runner.invoke(app, [*args, "--curve-server-key", str(server.certs.public("broker"))], env={"ZDEPTH_KEY": KEY})
    assert result.exit_code == 1
    assert "refused this client's CurveZMQ certificate" in result.output and "stranger.key" in result.output and "--curve-allow" in result.output

    # The broker's log says who was refused, why, and what to do; a peer that keeps trying is reported once a minute.
    refusals = refusal_lines(server, "stranger")
    assert len(refusals) == 1, server.procs["broker"].tail()
    assert "refused a CurveZMQ connection from 127.0.0.1" in refusals[0]
    assert f"is not in the allow directory {server.certs.allow}" in refusals[0] and "restart the broker" in refusals[0]


def refusal_lines(server: LiveCurveServer, name: str) -> list[str]:
    """The broker's log lines about refusing ``name``'s certificate (found by its public key, as an operator would)."""
    public_key, _ = zmq.auth.load_certificate(server.certs.public(name))
    return [line for line in server.procs["broker"].output().splitlines() if "refused a CurveZMQ connection" in line and public_key.decode() in line]


@pytest.mark.timeout(60)
def test_worker_without_an_allowed_key_never_registers(server: LiveCurveServer) -> None:
    rogue = server.procs["rogue"]
    # It loaded its model, connected, was refused at the handshake, and said so in words an operator can act on.
    assert rogue.popen.wait(40) != 0, rogue.tail()
    assert "refused this worker's CurveZMQ certificate" in rogue.output() and "--curve-allow" in rogue.output()
    assert len(refusal_lines(server, "rogue-gpu")) == 1, server.procs["broker"].tail()
    with Client(server.client_address, key=KEY, timeout=5, retries=0, curve=server.certs.client("robot")) as client:
        workers = client.health()["workers"]
    assert [w["pid"] for w in workers] == [server.procs["worker"].pid]  # the allowed worker only
    assert "unauthorized" not in rogue.output()  # refused before any message: not even READY got through


@pytest.mark.timeout(60)
def test_key_and_images_do_not_travel_in_clear(server: LiveCurveServer) -> None:
    image = marked_image()
    before = len(server.client_relay.seen()), len(server.worker_relay.seen())
    with Client(server.client_relay.address, key=KEY, timeout=10, retries=0, curve=server.certs.client("robot")) as client:
        result = client.relative_depth(image, input_size=28)  # raw pixels: the marker would be on the wire as it is
    assert result.depth.shape == image.shape[:2]
    client_link, worker_link = server.client_relay.seen(), server.worker_relay.seen()
    # The image went client -> broker -> worker, through both relays ...
    assert len(client_link) - before[0] > image.nbytes and len(worker_link) - before[1] > image.nbytes
    # ... and neither the shared key (in every request, and in the worker's READY) nor the pixels were readable.
    for wire in (client_link, worker_link):
        assert KEY.encode() not in wire
        assert MARKER * 2 not in wire
        assert b"relative_depth" not in wire


@pytest.mark.timeout(60)
def test_profile_with_curve_fields(runner: CliRunner, server: LiveCurveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Certificates beside the profile file, named relative to it.
    (tmp_path / "certs").mkdir()
    shutil.copy(server.certs.secret("robot"), tmp_path / "certs")
    shutil.copy(server.certs.public("broker"), tmp_path / "certs")
    (tmp_path / "lab.key").write_text(KEY + "\n")
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(
        f'[lab]\naddress = "{server.client_address}"\nkey_file = "lab.key"\ntimeout = 8\n'
        'curve_secret = "certs/robot.key_secret"\ncurve_server_key = "certs/broker.key"\n'
    )
    monkeypatch.setenv("ZDEPTH_CONFIG", str(profiles))
    with Client.from_profile("lab", retries=0) as client:
        assert client.timeout == 8.0
        assert client.relative_depth(marked_image(), input_size=28).depth.shape == (32, 48)

    result = runner.invoke(app, ["health", "-s", "lab", "--json"], env={"ZDEPTH_CONFIG": str(profiles)})
    assert result.exit_code == 0, result.output
    assert [w["pid"] for w in json.loads(result.stdout)["workers"]] == [server.procs["worker"].pid]
    # An option beats the profile: a stranger's certificate gets nowhere.
    stranger = ["--curve-secret", str(server.certs.secret("stranger")), "--timeout", "1"]
    result = runner.invoke(app, ["health", "-s", "lab", *stranger], env={"ZDEPTH_CONFIG": str(profiles)})
    assert result.exit_code == 1 and "refused this client's CurveZMQ certificate" in result.output

    profiles.write_text(f'[lab]\naddress = "{server.client_address}"\ncurve_secret = "certs/robot.key_secret"\n')
    with pytest.raises(ConfigError, match="curve_server_key"):
        Client.from_profile("lab")
