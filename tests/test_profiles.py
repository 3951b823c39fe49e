"""Server profiles: where the file lives, what it may hold, and errors a person can act on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from zdepth import ConfigError
from zdepth.profiles import Profile, Target, load_profile, load_profiles, profiles_path, resolve_server, resolve_target

pytestmark = pytest.mark.timeout(30)

GOOD = """
# the lab's servers
[lab]
address = "tcp://gpu-box:5555"
key_file = "lab.key"
model = "vitl-hypersim"
description = "two H100s in room 3"

[laptop]
address = "tcp://127.0.0.1:5555"

["with space"]
address = "tcp://10.0.0.2:5555"
key = "inline-secret"
"""


@pytest.fixture
def profiles_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "lab.key").write_text("s3cret\n")
    path = tmp_path / "profiles.toml"
    path.write_text(GOOD)
    path.chmod(0o600)
    monkeypatch.setenv("ZDEPTH_CONFIG", str(path))
    return path


def test_load_profile_reads_fields_and_key_file(profiles_file: Path) -> None:
    lab = load_profile("lab")
    assert lab == Profile(name="lab", address="tcp://gpu-box:5555", key="s3cret", model="vitl-hypersim")
    assert load_profile("laptop") == Profile("laptop", "tcp://127.0.0.1:5555", None, None)
    assert load_profile("with space").key == "inline-secret"
    assert set(load_profiles()) == {"lab", "laptop", "with space"}


def test_profile_is_frozen_and_hides_the_key(profiles_file: Path) -> None:
    lab = load_profile("lab")
    with pytest.raises(dataclasses.FrozenInstanceError):
        lab.address = "tcp://elsewhere:1"  # type: ignore[misc]
    assert "s3cret" not in repr(lab)


def test_missing_profile_lists_available_ones_and_the_file(profiles_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_profile("nope")
    message = str(info.value)
    assert "'nope'" in message and "lab" in message and "laptop" in message
    assert str(profiles_file) in message


def test_missing_file_says_where_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "absent.toml"
    monkeypatch.setenv("ZDEPTH_CONFIG", str(path))
    assert load_profiles() == {}
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_profile("lab")
    assert str(path) in str(info.value) and "address" in str(info.value)


def test_malformed_toml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[lab]\naddress = "tcp://a:1"\nmodel = vits\n')
    with pytest.raises(ConfigError) as info:
        load_profile("lab", path)
    message = str(info.value)
    assert str(path) in message and "not valid TOML" in message and "line 3" in message


@pytest.mark.parametrize(
    "body, match",
    [
        ('[lab]\naddress = 5555\n', r"address must be a string, got an integer 5555"),
        ('[lab]\naddress = "tcp://a:1"\nkey = ["x"]\n', r"key must be a string, got an array"),
        ('[lab]\naddress = "tcp://a:1"\nmodel = true\n', r"model must be a string, got a boolean"),
        ('lab = "tcp://a:1"\n', r"expected a table"),
        ('[lab]\nmodel = "vits"\n', r"needs an address"),
        ('[lab]\naddress = "tcp://a:1"\nadress = "x"\n', r"unknown field\(s\) adress"),
        ('[lab]\naddress = "tcp://a:1"\nkey = "a"\nkey_file = "b"\n', r"key or key_file, not both"),
        ('[lab]\naddress = "tcp://a:1"\nkey_file = "missing.key"\n', r"cannot read key file"),
    ],
)
def test_wrong_fields_are_config_errors_naming_the_profile(tmp_path: Path, body: str, match: str) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match) as info:
        load_profile("lab", path)
    assert "profile 'lab'" in str(info.value) and str(path) in str(info.value)


def test_empty_key_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.key").write_text("\n")
    path = tmp_path / "profiles.toml"
    path.write_text('[lab]\naddress = "tcp://a:1"\nkey_file = "empty.key"\n')
    with pytest.raises(ConfigError, match="empty"):
        load_profile("lab", path)


def test_default_location_honours_xdg_and_zdepth_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZDEPTH_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert profiles_path() == tmp_path / "xdg" / "zdepth" / "profiles.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert profiles_path() == tmp_path / "home" / ".config" / "zdepth" / "profiles.toml"
    monkeypatch.setenv("ZDEPTH_CONFIG", str(tmp_path / "elsewhere.toml"))
    assert profiles_path() == tmp_path / "elsewhere.toml"


def test_xdg_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZDEPTH_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "zdepth").mkdir()
    (tmp_path / "zdepth" / "profiles.toml").write_text('[home]\naddress = "tcp://h:5555"\n')
    assert load_profile("home").address == "tcp://h:5555"


def test_client_from_profile_uses_address_key_and_model(profiles_file: Path) -> None:
    from zdepth import Client

    client = Client.from_profile("lab")
    try:
        assert client.address == "tcp://gpu-box:5555"
        assert client.encoder == "vitl" and client.dataset == "hypersim"
        assert client._pipeline.key == "s3cret"
    finally:
        client.close()


# ----------------------------------------------------------------------------- timeout and CurveZMQ fields


def test_timeout_and_curve_fields_resolve_relative_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zdepth.protocol.curve import CurveClient, generate

    generate(tmp_path / "certs", "laptop")
    generate(tmp_path / "certs", "broker")
    path = tmp_path / "profiles.toml"
    path.write_text(
        '[lab]\naddress = "tcp://gpu-box:5555"\ntimeout = 7\n'
        'curve_secret = "certs/laptop.key_secret"\ncurve_server_key = "certs/broker.key"\n'
        '[plain]\naddress = "tcp://a:1"\ntimeout = 2.5\n'
    )
    lab = load_profile("lab", path)
    assert lab.timeout == 7.0 and isinstance(lab.timeout, float)
    assert lab.curve_secret == tmp_path / "certs" / "laptop.key_secret"
    assert lab.curve_server_key == tmp_path / "certs" / "broker.key"
    assert lab.curve == CurveClient(tmp_path / "certs" / "laptop.key_secret", tmp_path / "certs" / "broker.key")
    plain = load_profile("plain", path)
    assert plain.curve is None and plain.timeout == 2.5
    assert "laptop.key_secret" in repr(lab)  # paths are no secret; the key still never shows

    from zdepth import Client

    monkeypatch.setenv("ZDEPTH_CONFIG", str(path))
    client = Client.from_profile("lab")
    try:
        assert client.timeout == 7.0 and client.curve == lab.curve
        client.open()  # the certificates load onto a real socket
    finally:
        client.close()
    assert Client.from_profile("lab", timeout=1.0, curve=None).curve is None  # overrides win
    assert Client.from_profile("plain").timeout == 2.5


@pytest.mark.parametrize(
    "body, match",
    [
        ('[lab]\naddress = "tcp://a:1"\ntimeout = "10"\n', r"timeout must be a positive number of seconds, got str"),
        ('[lab]\naddress = "tcp://a:1"\ntimeout = 0\n', r"timeout must be a positive number"),
        ('[lab]\naddress = "tcp://a:1"\ntimeout = true\n', r"timeout must be a positive number"),
        ('[lab]\naddress = "tcp://a:1"\ncurve_secret = "c.key_secret"\n', r"curve_secret needs curve_server_key"),
        ('[lab]\naddress = "tcp://a:1"\ncurve_server_key = "b.key"\n', r"curve_server_key needs curve_secret"),
        ('[lab]\naddress = "tcp://a:1"\ncurve_secret = "missing"\ncurve_server_key = "b.key"\n', r"curve_secret .*missing is not a file"),
        ('[lab]\naddress = "tcp://a:1"\ncurve_secret = 1\ncurve_server_key = "b.key"\n', r"curve_secret must be a string"),
    ],
)
def test_wrong_timeout_or_curve_fields(tmp_path: Path, body: str, match: str) -> None:
    (tmp_path / "b.key").write_text("x")
    path = tmp_path / "profiles.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match) as info:
        load_profile("lab", path)
    assert "profile 'lab'" in str(info.value)


def test_a_profile_may_name_several_brokers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "profiles.toml"
    monkeypatch.setenv("ZDEPTH_CONFIG", str(path))
    path.write_text('[lab]\naddresses = ["gpu-a:5555", "tcp://gpu-b:6000"]\n')
    lab = load_profile("lab")
    assert lab.addresses == ("tcp://gpu-a:5555", "tcp://gpu-b:6000")
    assert lab.address == "tcp://gpu-a:5555,tcp://gpu-b:6000"  # what Client takes back
    for table, error in (('address = "a:1"\naddresses = ["b:2"]', "not both"), ('addresses = ["a:1", "tcp://a:1"]', "twice"), ("addresses = []", "list")):
        path.write_text(f"[lab]\n{table}\n")
        with pytest.raises(ConfigError, match=error):
            load_profile("lab")


@pytest.mark.parametrize(
    "text, expected",
    [("a:5555,b:5556", "tcp://a:5555,tcp://b:5556"), (" tcp://a:1 , b:2 ", "tcp://a:1,tcp://b:2")],
)
def test_several_addresses_on_one_line(text: str, expected: str) -> None:
    assert resolve_server(text) == (expected, None)


@pytest.mark.parametrize("text", ["a:5555,", "a:5555,lab", "a:5555,a:5555", "a:5555,http://b"])
def test_several_addresses_refuse_what_is_not_one(text: str) -> None:
    with pytest.raises(ConfigError):
        resolve_server(text)


def test_resolve_target_given_then_profile_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What --server resolves to: a setting given beats the profile's, which beats one from a ZDEPTH_* variable."""
    from zdepth.protocol.curve import CurveClient, generate

    for name in ("ZDEPTH_KEY", "ZDEPTH_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    _, laptop = generate(tmp_path / "certs", "laptop")
    broker, _ = generate(tmp_path / "certs", "broker")
    _, other = generate(tmp_path / "certs", "other")
    (tmp_path / "lab.key").write_text("lab-secret\n")
    path = tmp_path / "profiles.toml"
    path.write_text(
        '[lab]\naddress = "tcp://gpu-box:5555"\nkey_file = "lab.key"\nmodel = "vits-hypersim"\ntimeout = 7\n'
        'curve_secret = "certs/laptop.key_secret"\ncurve_server_key = "certs/broker.key"\n'
    )
    monkeypatch.setenv("ZDEPTH_CONFIG", str(path))
    lab = Target("tcp://gpu-box:5555", "lab-secret", "vits-hypersim", 7.0, CurveClient(laptop, broker))
    assert resolve_target("lab") == lab
    given = dict(key="typed", timeout=1.0, model="vits", curve_secret=other)
    assert resolve_target("lab", **given) == Target("tcp://gpu-box:5555", "typed", "vits", 1.0, CurveClient(other, broker))
    assert resolve_target("lab", **given, from_environment=set(given)) == lab
    monkeypatch.setenv("ZDEPTH_KEY", "env-key")
    assert resolve_target("gpu:5555") == Target("tcp://gpu:5555", "env-key", None, None, None)
    with pytest.raises(ConfigError, match="^--server: no profile 'nope'"):
        resolve_target("nope", where="--server")
    with pytest.raises(ConfigError, match="got only --curve-server-key"):
        resolve_target("gpu:5555", curve_server_key=broker)
