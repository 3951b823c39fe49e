"""Optional CurveZMQ encryption, with an allow-list of client and worker keys.

Without it, the shared key and the images cross the LAN in clear, like the
HTTP server zdepth replaces. With it, every connection to the broker is
encrypted and authenticated (Curve25519): the broker holds a secret
certificate, each client and worker holds its own, and only those whose public
certificates lie in the broker's allow directory may connect. The shared key
is still checked on top.

Certificates are the text files ZeroMQ's own tools write (``zdepth keygen``):
``NAME.key`` (public, safe to copy around) and ``NAME.key_secret`` (keep it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveServer:
    """The broker side: its secret certificate, and the public certificates it lets in."""

    secret_file: Path
    allow_dir: Path | None = None  # None: any peer that knows the broker's public key (encryption only)


@dataclass(frozen=True)
class CurveClient:
    """A client or worker side: its own secret certificate and the broker's public one."""

    secret_file: Path
    server_public_file: Path


def generate(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``out_dir``; returns (public, secret)."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(out, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public_key, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CurveZMQ certificate {path}: {exc}; create one with `zdepth keygen`") from exc
    if secret and secret_key is None:
        raise ConfigError(f"{path} is a public certificate; this option needs the secret one (NAME.key_secret)")
    return public_key, secret_key


def start_authenticator(context: zmq.Context, server: CurveServer) -> ThreadAuthenticator:
    """ZAP handler for every CURVE server socket of ``context``; stop it when the sockets close."""
    if not zmq.has("curve"):
        raise ConfigError("this libzmq was built without CURVE support; install pyzmq from its wheels")
    auth = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
    auth.start()
    if server.allow_dir is None:
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    else:
        if not Path(server.allow_dir).is_dir():
            auth.stop()
            raise ConfigError(f"CurveZMQ allow directory {server.allow_dir} does not exist; put the public NAME.key files of allowed clients and workers there")
        auth.configure_curve(domain="*", location=str(server.allow_dir))
    return auth


def apply_server(sock: zmq.Socket, server: CurveServer) -> None:
    public_key, secret_key = _load(Path(server.secret_file), secret=True)
    sock.curve_publickey = public_key
    sock.curve_secretkey = secret_key
    sock.curve_server = True


def apply_client(sock: zmq.Socket, client: CurveClient) -> None:
    public_key, secret_key = _load(Path(client.secret_file), secret=True)
    server_key, _ = _load(Path(client.server_public_file), secret=False)
    sock.curve_publickey = public_key
    sock.curve_secretkey = secret_key
    sock.curve_serverkey = server_key
