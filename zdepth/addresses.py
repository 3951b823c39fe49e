"""ZeroMQ addresses as people type them: ``gpu-box``, ``gpu-box:5555``, ``tcp://gpu-box:5555``,
``ipc://PATH``, ``inproc://NAME``, normalised to one endpoint, with an error that shows the forms
accepted instead of libzmq's "Invalid argument"."""

from __future__ import annotations

import re

from zdepth.errors import ConfigError

ADDRESS_FORMS = "tcp://HOST:PORT, HOST:PORT, ipc://PATH or inproc://NAME"
BIND_FORMS = "tcp://HOST:PORT (HOST * for every interface, PORT * for any free port), ipc://PATH or inproc://NAME"
_SCHEMES = ("tcp", "ipc", "inproc")
_HOST = re.compile(r"\[[0-9A-Fa-f:.%\w]+\]|[^\s/:\[\];@?#]+")


def normalize_address(text: str, *, default_port: int = 5555, bind: bool = False) -> str:
    """A ZeroMQ endpoint for an address a person typed, or ConfigError (one line) naming the accepted forms.

    Accepts ``tcp://HOST:PORT``, ``HOST:PORT`` (read as tcp), ``[IPv6]:PORT``,
    ``ipc://PATH`` and ``inproc://NAME``; the scheme is case-insensitive.
    ``bind``: the address is one to listen on, so ``*`` as the host (every
    interface) or as the port (any free port) is allowed. ``default_port``
    only shapes the suggestion when the port is missing: ZeroMQ itself would
    fail later, or hang, on such an address, which is why it is refused here.
    """
    forms = BIND_FORMS if bind else ADDRESS_FORMS
    if not isinstance(text, str):
        raise ConfigError(f"an address must be a string such as tcp://gpu-box:{default_port}, got {type(text).__name__} {text!r}")
    raw = text.strip()
    if not raw:
        raise ConfigError(f"empty address; accepted forms: {forms}")
    if any(c.isspace() for c in raw):
        raise ConfigError(f"{raw!r} is not an address (it holds a space); accepted forms: {forms}")
    scheme, sep, rest = raw.partition("://")
    if not sep:
        typo = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*):?/+(.*)", raw)
        if typo:  # tcp//host:5555, tcp:/host:5555
            fixed = f"{typo.group(1).lower()}://{typo.group(2)}"
            raise ConfigError(f"{raw!r} is not an address (did you mean {fixed}?); accepted forms: {forms}")
        scheme, rest = "tcp", raw
    scheme = scheme.lower()
    if scheme in ("http", "https", "ws", "wss"):
        raise ConfigError(
            f"{raw!r}: zdepth speaks ZeroMQ, not {scheme.upper()}; give the broker's address as tcp://HOST:{default_port} "
            f"(accepted forms: {forms})"
        )
    if scheme not in _SCHEMES:
        raise ConfigError(f"{raw!r}: unsupported scheme {scheme}://; accepted forms: {forms}")
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise ConfigError(f"{raw!r} names no {'path' if scheme == 'ipc' else 'name'}; accepted forms: {forms}")
        return f"{scheme}://{rest}"
    return f"tcp://{_host_port(raw, rest, default_port=default_port, bind=bind, forms=forms)}"


def _host_port(raw: str, rest: str, *, default_port: int, bind: bool, forms: str) -> str:
    """``HOST:PORT`` of a tcp address, checked."""
    if rest.startswith("[") and "]" in rest:  # [IPv6] or [IPv6]:PORT
        end = rest.index("]") + 1
        host, sep, port = rest[:end], rest[end : end + 1], rest[end + 1 :]
        if rest[end:] and sep != ":":
            raise ConfigError(f"{raw!r} is not an address; accepted forms: {forms}")
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            host, port = rest, ""
        elif ":" in host:  # an IPv6 address without brackets is ambiguous
            raise ConfigError(f"{raw!r}: put an IPv6 address in brackets, e.g. tcp://[::1]:{default_port}; accepted forms: {forms}")
    if not host:
        suggestion = f"tcp://*:{port or default_port}" if bind else f"tcp://localhost:{port or default_port}"
        raise ConfigError(f"{raw!r} has no host (did you mean {suggestion}?); accepted forms: {forms}")
    if not sep or not port:
        raise ConfigError(f"{raw!r} has no port (did you mean tcp://{host}:{default_port}?); accepted forms: {forms}")
    if not _HOST.fullmatch(host):
        raise ConfigError(f"{raw!r}: {host!r} is not a host name or IP address; accepted forms: {forms}")
    if host == "*" and not bind:
        raise ConfigError(
            f"{raw!r} is an address to listen on (every interface); to connect, name the host, e.g. tcp://localhost:{port}"
        )
    if port == "*":
        if not bind:
            raise ConfigError(f"{raw!r}: port * (any free port) is only for listening; give the port number to connect to")
    elif not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{raw!r}: port {port!r} is not a number from 1 to 65535; accepted forms: {forms}")
    else:
        port = str(int(port))
    return f"{host}:{port}"


def looks_like_address(text: str) -> bool:
    """Whether ``--server TEXT`` is meant as an address rather than a profile name: it holds ``:`` or ``/``."""
    return ":" in text or "/" in text
