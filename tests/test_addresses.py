"""Addresses as people type them: accepted forms become ZeroMQ endpoints, anything else a one-line ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from zdepth import ConfigError
from zdepth.profiles import ADDRESS_FORMS, normalize_address, resolve_server

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
        ("  tcp://gpu-box:5556 ", "tcp://gpu-box:5556"),
        ("TCP://Gpu-Box:5555", "tcp://Gpu-Box:5555"),
        ("gpu-box:5555", "tcp://gpu-box:5555"),
        ("10.0.0.2:7000", "tcp://10.0.0.2:7000"),
        ("tcp://h:05555", "tcp://h:5555"),
        ("[::1]:5555", "tcp://[::1]:5555"),
        ("tcp://[fe80::1%eth0]:5555", "tcp://[fe80::1%eth0]:5555"),
        ("ipc:///tmp/zdepth-workers", "ipc:///tmp/zdepth-workers"),
        ("ipc://relative.ipc", "ipc://relative.ipc"),
        ("inproc://workers", "inproc://workers"),
    ],
)
def test_accepted_forms(text: str, endpoint: str) -> None:
    assert normalize_address(text) == endpoint
    assert normalize_address(endpoint) == endpoint  # idempotent


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("tcp://127.0.0.1", "has no port (did you mean tcp://127.0.0.1:5555?)"),
        ("localhost", "has no port (did you mean tcp://localhost:5555?)"),
        ("tcp://gpu-box:", "has no port"),
        ("tcp//host:5555", "did you mean tcp://host:5555?"),
        ("tcp:/host:5555", "did you mean tcp://host:5555?"),
        ("http://gpu-box:8000/rel_depth", "zdepth speaks ZeroMQ, not HTTP"),
        ("https://gpu-box", "not HTTPS"),
        ("", "empty address"),
        ("   ", "empty address"),
        ("tcp://h:0", "port '0' is not a number from 1 to 65535"),
        ("tcp://h:65536", "port '65536'"),
        ("tcp://h:http", "port 'http'"),
        ("h:-1", "port '-1'"),
        ("tcp://:5555", "has no host (did you mean tcp://localhost:5555?)"),
        ("tcp://*:5555", "is an address to listen on"),
        ("tcp://h:*", "only for listening"),
        ("::1:5555", "put an IPv6 address in brackets"),
        ("ftp://a:1", "unsupported scheme ftp://"),
        ("udp://a:1", "unsupported scheme udp://"),
        ("ipc://", "names no path"),
        ("inproc://", "names no name"),
        ("gpu box:5555", "holds a space"),
        ("tcp://a/b:1", "is not a host name"),
    ],
)
def test_refused_forms_say_why_in_one_line(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        normalize_address(text)
    message = str(info.value)
    assert says in message
    assert "\n" not in message


def test_errors_name_the_accepted_forms() -> None:
    for text in ("tcp://127.0.0.1", "tcp//host:5555", "http://a:1", "", "tcp://h:99999"):
        with pytest.raises(ConfigError, match="accepted forms") as info:
            normalize_address(text)
        assert ADDRESS_FORMS in str(info.value)


def test_default_port_shapes_the_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"tcp://box:5556\?"):
        normalize_address("tcp://box", default_port=5556)


def test_bind_forms() -> None:
    assert normalize_address("tcp://*:5555", bind=True) == "tcp://*:5555"
    assert normalize_address("tcp://127.0.0.1:*", bind=True) == "tcp://127.0.0.1:*"
    assert normalize_address("*:5556", bind=True) == "tcp://*:5556"
    assert normalize_address("tcp://0.0.0.0:5556", bind=True) == "tcp://0.0.0.0:5556"
    with pytest.raises(ConfigError, match=r"did you mean tcp://\*:5555\?"):
        normalize_address("tcp://:5555", bind=True)
    with pytest.raises(ConfigError, match="PORT \\* for any free port"):
        normalize_address("tcp://*", bind=True)


@pytest.mark.parametrize("text", ["tcp://127.0.0.1:*", "tcp://*:*", "ipc://{tmp}/z.ipc", "inproc://z"])
def test_bind_forms_bind_in_zeromq(text: str, tmp_path: Path) -> None:
    """What normalize_address lets through for a listener, ZeroMQ accepts."""
    endpoint = normalize_address(text.format(tmp=tmp_path), bind=True)
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.linger = 0
        sock.bind(endpoint)


hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)


@given(host=hosts, port=st.integers(1, 65535), scheme=st.sampled_from(["", "tcp://", "TCP://"]))
@settings(max_examples=200, deadline=None)
def test_any_host_and_port_round_trips(host: str, port: int, scheme: str) -> None:
    assert normalize_address(f"{scheme}{host}:{port}") == f"tcp://{host}:{port}"


@given(st.text(max_size=40))
@settings(max_examples=500, deadline=None)
def test_any_text_gives_an_endpoint_or_one_line_config_error(text: str) -> None:
    try:
        endpoint = normalize_address(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert endpoint.split("://", 1)[0] in ("tcp", "ipc", "inproc")
        assert normalize_address(endpoint) == endpoint


@pytest.fixture
def profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "profiles.toml"
    path.write_text('[lab]\naddress = "gpu-box:5555"\nmodel = "vits"\n')
    monkeypatch.setenv("ZDEPTH_CONFIG", str(path))
    return path


def test_resolve_server_takes_an_address_or_a_profile(profiles: Path) -> None:
    assert resolve_server("tcp://a:1") == ("tcp://a:1", None)
    assert resolve_server("a:1") == ("tcp://a:1", None)
    address, profile = resolve_server("lab")
    assert address == "tcp://gpu-box:5555"  # the profile's address is normalised too
    assert profile is not None and profile.name == "lab" and profile.model == "vits"


def test_resolve_server_errors(profiles: Path) -> None:
    with pytest.raises(ConfigError, match="no profile 'gpu-box'.*give its port: tcp://gpu-box:5555"):
        resolve_server("gpu-box")
    with pytest.raises(ConfigError, match="has no port"):
        resolve_server("tcp://127.0.0.1")
    with pytest.raises(ConfigError, match="no server given"):
        resolve_server("  ")


def test_a_profile_with_a_bad_address_names_the_profile(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text('[broken]\naddress = "tcp://gpu-box"\n')
    with pytest.raises(ConfigError, match="profile 'broken'.*address 'tcp://gpu-box' has no port") as info:
        resolve_server("broken", path=path)
    assert "give its port: tcp://broken" not in str(info.value)
