"""Named servers in a TOML file, so that code and commands say ``lab`` instead of an address and a key.

The file is ``$ZDEPTH_CONFIG`` when set, else ``$XDG_CONFIG_HOME/zdepth/profiles.toml``,
else ``~/.config/zdepth/profiles.toml``. One table per server::

    [lab]
    address = "tcp://gpu-box:5555"
    key_file = "~/.config/zdepth/lab.key"   # or key = "...", never both
    model = "vitl-hypersim"                  # optional: the default model
    timeout = 10.0                           # optional: seconds to wait for each reply
    curve_secret = "curve/laptop.key_secret" # optional, with curve_server_key: CurveZMQ
    curve_server_key = "curve/lab-broker.key"
    description = "the 2-GPU box in room 3"  # optional, for people

    [laptop]
    address = "tcp://127.0.0.1:5555"

Relative paths (``key_file``, ``curve_secret``, ``curve_server_key``) are read
relative to the profile file. Prefer ``key_file`` over ``key``: the profile
file can then be shared. ``curve_secret`` (this machine's secret certificate,
from ``zdepth keygen``) and ``curve_server_key`` (the broker's public
certificate) come together or not at all; they are for a broker that runs
CurveZMQ (see ``zdepth.protocol.curve``). Used by ``Client.from_profile("lab")`` and
``--server lab`` on the command line (where ``--timeout``, ``--curve-secret``
and ``--curve-server-key`` win over the profile).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zdepth.addresses import ADDRESS_FORMS, looks_like_address, normalize_address  # long imported from here
from zdepth.config import read_key
from zdepth.errors import ConfigError

if TYPE_CHECKING:
    from zdepth.protocol.curve import CurveClient

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ADDRESS_FORMS",
    "CONFIG_ENV",
    "Profile",
    "Target",
    "config_dir",
    "load_profile",
    "load_profiles",
    "looks_like_address",
    "normalize_address",
    "profiles_path",
    "resolve_server",
    "resolve_target",
]

logger = logging.getLogger(__name__)

CONFIG_ENV = "ZDEPTH_CONFIG"
STRING_FIELDS = ("address", "key", "key_file", "model", "description", "curve_secret", "curve_server_key")
FIELDS = (*STRING_FIELDS, "addresses", "timeout")


@dataclass(frozen=True)
class Profile:
    """One named server. ``key`` is the secret itself (already read from ``key_file``), or None."""

    name: str
    address: str  # every broker, comma-joined (what Client accepts back)
    key: str | None = None
    model: str | None = None
    timeout: float | None = None  # seconds per reply; None: the client's default
    curve_secret: Path | None = None  # this client's secret certificate, resolved against the profile file
    curve_server_key: Path | None = None  # the broker's public certificate, likewise
    addresses: tuple[str, ...] = ()  # the brokers in order of preference (one: the address alone)

    def __post_init__(self) -> None:
        if not self.addresses:
            object.__setattr__(self, "addresses", tuple(self.address.split(",")))

    @property
    def curve(self) -> CurveClient | None:
        """The CurveZMQ settings for a client of this server, or None for a broker without encryption."""
        if self.curve_secret is None or self.curve_server_key is None:
            return None
        from zdepth.protocol.curve import CurveClient

        return CurveClient(self.curve_secret, self.curve_server_key)

    def __repr__(self) -> str:  # never print the key
        key = "None" if self.key is None else "'***'"
        extra = "".join(
            f", {name}={getattr(self, name)!r}" for name in ("timeout", "curve_secret", "curve_server_key") if getattr(self, name) is not None
        )
        return f"Profile(name={self.name!r}, address={self.address!r}, key={key}, model={self.model!r}{extra})"


def resolve_server(text: str, *, default_port: int = 5555, path: str | os.PathLike[str] | None = None) -> tuple[str, Profile | None]:
    """(endpoint, profile or None) for what a user gave as a server: an address, or a profile name.

    Anything with ``:`` or ``/`` is an address (see normalize_address);
    otherwise it names a profile, and the profile's address is returned.
    ConfigError, one line, when it is neither.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"no server given: pass an address ({ADDRESS_FORMS}) or a profile name")
    name = text.strip()
    if "," in name:  # several brokers: a client uses one and fails over to the next
        return ",".join(_address_list(name.split(","), default_port=default_port, where=repr(name))), None
    if looks_like_address(name):
        return normalize_address(name, default_port=default_port), None
    file = Path(path).expanduser() if path is not None else profiles_path()
    as_address = f"for an address, give its port: tcp://{name}:{default_port}"
    if not file.exists():
        raise ConfigError(
            f"no profile {name!r}: the profiles file {file} does not exist (create it with a table "
            f'[{_toml_key(name)}] holding address = "tcp://HOST:{default_port}", or point {CONFIG_ENV} at one); {as_address}'
        )
    profiles = load_profiles(file)
    if name not in profiles:
        available = ", ".join(sorted(profiles)) or "none"
        raise ConfigError(f"no profile {name!r} in {file} (available profiles: {available}); {as_address}")
    profile = profiles[name]
    return profile.address, profile


@dataclass(frozen=True)
class Target:
    """Where a client goes: the address, key, default model, timeout and CurveZMQ settings."""

    address: str
    key: str | None
    model: str | None
    timeout: float | None
    curve: CurveClient | None


def resolve_target(
    server: str,
    *,
    key: str | None = None,
    key_file: str | os.PathLike[str] | None = None,
    curve_secret: Path | None = None,
    curve_server_key: Path | None = None,
    timeout: float | None = None,
    model: str | None = None,
    from_environment: Collection[str] = (),
    where: str | None = None,
) -> Target:
    """``server`` (an address or a profile name) with the key, model, timeout and CurveZMQ certificates that go with it.

    Each setting: the one given, else the profile's, else the environment's. ``from_environment`` names the
    settings given here that came from ZDEPTH_* variables: they lose to the profile, so that ``--server lab``
    uses lab's key even where ZDEPTH_KEY holds another broker's. ``where`` prefixes errors about ``server``
    itself (the option that named it). The certificates are read now: a wrong file is a ConfigError.
    """
    from zdepth.protocol.curve import client_curve

    try:
        address, profile = resolve_server(server)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None

    def pick(name: str, value: Any, from_profile: Any) -> Any:
        if value is not None and name not in from_environment:
            return value
        return from_profile if from_profile is not None else value

    typed = {name: value for name, value in (("key", key), ("key_file", key_file)) if value and name not in from_environment}
    if typed:
        secret = read_key(typed.get("key"), typed.get("key_file"))
    elif profile is not None and profile.key:
        secret = profile.key
    else:
        secret = read_key(key, key_file)
    curve = client_curve(
        pick("curve_secret", curve_secret, profile.curve_secret if profile else None),
        pick("curve_server_key", curve_server_key, profile.curve_server_key if profile else None),
    )
    return Target(
        address,
        secret,
        pick("model", model, profile.model if profile else None),
        pick("timeout", timeout, profile.timeout if profile else None),
        curve,
    )


def config_dir() -> Path:
    """The user's zdepth config directory: ``$XDG_CONFIG_HOME/zdepth``, else ``~/.config/zdepth``."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "zdepth"


def profiles_path() -> Path:
    """Where profiles are read from: ``$ZDEPTH_CONFIG``, else the user's config directory."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    return config_dir() / "profiles.toml"


def load_profiles(path: str | os.PathLike[str] | None = None) -> dict[str, Profile]:
    """Every profile in the file, by name; an absent file holds none.

    Raises ConfigError naming the file (and the line, for TOML syntax errors)
    when the file cannot be read, is not valid TOML, or a field has the wrong type.
    """
    path = Path(path).expanduser() if path is not None else profiles_path()
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read profiles file {path}: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message carries "(at line L, column C)"
        raise ConfigError(f"profiles file {path} is not valid TOML: {exc}") from exc
    return {name: _profile(name, table, path) for name, table in data.items()}


def load_profile(name: str, path: str | os.PathLike[str] | None = None) -> Profile:
    """The profile called ``name``; ConfigError lists the available ones and the file when it is missing."""
    path = Path(path).expanduser() if path is not None else profiles_path()
    profiles = load_profiles(path)
    if name in profiles:
        return profiles[name]
    if not path.exists():
        raise ConfigError(
            f"no profile {name!r}: the profiles file {path} does not exist. Create it with a table such as\n"
            f'  [{_toml_key(name)}]\n  address = "tcp://gpu-box:5555"\n  key_file = "~/.config/zdepth/{name}.key"\n'
            f"or point {CONFIG_ENV} at another file."
        )
    available = ", ".join(sorted(profiles)) or "none"
    raise ConfigError(f"no profile {name!r} in {path}; available profiles: {available}")


def _profile(name: str, table: Any, path: Path) -> Profile:
    where = f"profile {name!r} in {path}"
    if not isinstance(table, dict):
        raise ConfigError(
            f"{where}: expected a table ([{_toml_key(name)}] with address = ...), got {_type(table)} {table!r}"
        )
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed fields: {', '.join(FIELDS)}")
    for field in STRING_FIELDS:
        if field in table and not isinstance(table[field], str):
            raise ConfigError(f"{where}: {field} must be a string, got {_type(table[field])} {table[field]!r}")
    timeout = table.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf")):
        raise ConfigError(f"{where}: timeout must be a positive number of seconds, got {_type(timeout)} {timeout!r}")
    if "address" in table and "addresses" in table:
        raise ConfigError(f"{where}: give address or addresses, not both")
    if "addresses" in table:
        listed = table["addresses"]
        if not isinstance(listed, list) or not listed or not all(isinstance(a, str) for a in listed):
            raise ConfigError(f'{where}: addresses must be a list of strings, e.g. addresses = ["tcp://a:5555", "tcp://b:5555"]')
        addresses = tuple(_address_list(listed, where=f"{where}: addresses"))
    else:
        address = table.get("address", "").strip()
        if not address:
            raise ConfigError(f'{where}: needs an address, for example address = "tcp://gpu-box:5555"')
        try:
            addresses = (normalize_address(address),)
        except ConfigError as exc:
            raise ConfigError(f"{where}: address {exc}") from None
    if "key" in table and "key_file" in table:
        raise ConfigError(f"{where}: give key or key_file, not both")
    key = table.get("key") or None
    if "key_file" in table:
        key_file = _relative_to(path, table["key_file"])
        try:
            key = read_key(key_file=key_file)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    elif key is not None:
        _warn_if_readable(path, name)
    model = table.get("model") or None
    curve_secret, curve_server_key = _curve_paths(table, path, where)
    return Profile(
        name=name,
        address=",".join(addresses),
        addresses=addresses,
        key=key,
        model=model,
        timeout=float(timeout) if timeout is not None else None,
        curve_secret=curve_secret,
        curve_server_key=curve_server_key,
    )


def _address_list(parts: list[str], *, default_port: int = 5555, where: str) -> list[str]:
    """Several broker addresses, each checked; empty parts, profile names and repeats are refused."""
    out: list[str] = []
    for part in (p.strip() for p in parts):
        if not part or not looks_like_address(part):
            raise ConfigError(f"{where}: {part!r} is not an address; several brokers are given as addresses, e.g. a:5555,b:5555")
        try:
            address = normalize_address(part, default_port=default_port)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if address in out:
            raise ConfigError(f"{where}: {address} is given twice")
        out.append(address)
    return out


def _relative_to(profile_file: Path, value: str) -> Path:
    """``value`` with ``~`` expanded; a relative path is taken relative to the profile file's folder."""
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else profile_file.parent / candidate


def _curve_paths(table: dict[str, Any], path: Path, where: str) -> tuple[Path | None, Path | None]:
    """Both CurveZMQ certificate paths, or neither; each must be an existing file."""
    given = [field for field in ("curve_secret", "curve_server_key") if table.get(field)]
    if not given:
        return None, None
    if len(given) == 1:
        missing = "curve_server_key (the broker's public NAME.key)" if given == ["curve_secret"] else "curve_secret (this machine's NAME.key_secret)"
        raise ConfigError(f"{where}: {given[0]} needs {missing} too; CurveZMQ takes both or neither")
    secret, server_key = (_relative_to(path, table[field]) for field in ("curve_secret", "curve_server_key"))
    for field, file in (("curve_secret", secret), ("curve_server_key", server_key)):
        if not file.is_file():
            raise ConfigError(f"{where}: {field} {file} is not a file; create certificates with `zdepth keygen NAME`")
    return secret, server_key


def _warn_if_readable(path: Path, name: str) -> None:
    """A key written into the file itself should not be readable by other users."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        logger.warning("profile %r holds a key in %s, which other users can read; chmod 600 it or use key_file", name, path)


def _type(value: Any) -> str:
    return {dict: "a table", list: "an array", bool: "a boolean", int: "an integer", float: "a float"}.get(
        type(value), type(value).__name__
    )


def _toml_key(name: str) -> str:
    bare = name and all(c.isalnum() or c in "-_" for c in name)
    return name if bare else '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
