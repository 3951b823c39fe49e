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

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from zdepth.errors import BrokerUnreachable, ConfigError, DeadlineExceeded

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
    path = Path(path).expanduser()  # "~/.config/zdepth/curve/robot1.key_secret" as a person writes it
    try:
        public_key, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CurveZMQ certificate {path}: {exc}; create one with `zdepth keygen`") from exc
    if secret and secret_key is None:
        raise ConfigError(f"{path} is a public certificate; this option needs the secret one (NAME.key_secret)")
    return public_key, secret_key


REFUSAL_LOG_INTERVAL_S = 60.0  # a peer that keeps retrying is logged once a minute, with a count


class _CurveAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, plus one warning per refused peer that says who it was and what to do.

    libzmq only tells the peer "refused"; the operator reading the broker's log needs
    the peer's address, its public key (to find its NAME.key) and where that key must go.
    """

    def __init__(self, context: zmq.Context, allow_dir: Path | None) -> None:
        super().__init__(context, log=logging.getLogger(f"{__name__}.zap"))
        self.allow_dir = allow_dir
        self._request: list[bytes] | None = None
        self._refusals: dict[tuple[str, bytes], tuple[float, int]] = {}  # (address, key) -> (last logged, refused since)
        self._lock = threading.Lock()

    def handle_zap_message(self, msg: list[bytes]):  # noqa: ANN201 - returns whatever the base returns (a coroutine)
        self._request = msg  # the ZAP thread handles one request at a time
        return super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous") -> None:
        request, self._request = self._request, None
        if status_code != b"200" and request is not None and len(request) >= 7 and request[5] == b"CURVE":
            self._log_refusal(request[3].decode("utf-8", "replace"), request[6], status_text.decode("utf-8", "replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)

    def _log_refusal(self, address: str, public_key: bytes, reason: str) -> None:
        z85 = zmq.utils.z85.encode(public_key).decode("ascii") if len(public_key) == 32 else public_key.hex()
        now = time.monotonic()
        with self._lock:
            last, count = self._refusals.get((address, public_key), (-float("inf"), 0))
            count += 1
            if now - last < REFUSAL_LOG_INTERVAL_S:
                self._refusals[(address, public_key)] = (last, count)
                return
            self._refusals[(address, public_key)] = (now, 0)
        again = f" ({count} refusals of it since the last report)" if count > 1 else ""
        log.warning(
            "refused a CurveZMQ connection from %s: its public key %s is not in the allow directory %s%s. If this client "
            "or worker should connect, copy its NAME.key (the file holding that key, beside its NAME.key_secret) into %s "
            "and restart the broker",
            address or "an unknown address", z85, self.allow_dir, again, self.allow_dir,
        )  # fmt: skip
        log.debug("ZAP refused %s: %s", address, reason)


def start_authenticator(context: zmq.Context, server: CurveServer) -> ThreadAuthenticator:
    """ZAP handler for every CURVE server socket of ``context``; stop it when the sockets close."""
    if not zmq.has("curve"):
        raise ConfigError("this libzmq was built without CURVE support; install pyzmq from its wheels")
    auth = _CurveAuthenticator(context, Path(server.allow_dir) if server.allow_dir is not None else None)
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


# ----------------------------------------------------------------------------- from options to settings
# The commands take certificate paths (options, profile fields, ZDEPTH_CURVE_* variables); these turn them
# into settings and read the files at once, so that a wrong file is a ConfigError (exit 2) before anything starts.
# Their messages name the command's options, which is where a person fixes them.


def check_certificates(curve: CurveServer | CurveClient) -> None:
    """Read the certificates now (ConfigError naming the file), on a throwaway socket."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as probe:
        probe.linger = 0
        if isinstance(curve, CurveServer):
            apply_server(probe, curve)
        else:
            apply_client(probe, curve)


def client_curve(secret: Path | None, server_key: Path | None) -> CurveClient | None:
    """A worker's or client's settings, None without either file; ConfigError for half a pair."""
    if secret is None and server_key is None:
        return None
    if secret is None or server_key is None:
        raise ConfigError(
            "CurveZMQ needs both --curve-secret (this machine's NAME.key_secret) and --curve-server-key (the broker's public NAME.key); "
            f"got only {'--curve-secret' if secret is not None else '--curve-server-key'}"
        )
    curve = CurveClient(secret.expanduser(), server_key.expanduser())
    check_certificates(curve)
    return curve


def server_curve(secret: Path | None, allow: Path | None) -> CurveServer | None:
    """The broker's settings, or None; ConfigError for an allow folder without a certificate.

    Logs what the allow folder means (nothing to allow, none allowed, how many), because a
    wrong folder otherwise shows only as peers that cannot connect.
    """
    if secret is None:
        if allow is not None:
            raise ConfigError("--curve-allow needs --curve-secret (the broker's NAME.key_secret from `zdepth keygen`)")
        return None
    curve = CurveServer(secret.expanduser(), allow.expanduser() if allow is not None else None)
    check_certificates(curve)
    if curve.allow_dir is None:
        log.warning("CurveZMQ without --curve-allow: traffic is encrypted, but any client or worker that knows the broker's public key may connect")
    elif not curve.allow_dir.is_dir():
        raise ConfigError(f"--curve-allow {curve.allow_dir} is not a folder; put the public NAME.key of each allowed client and worker there")
    else:
        allowed = sorted(p.name for p in curve.allow_dir.glob("*.key"))
        if not allowed:
            log.warning("CurveZMQ allow folder %s holds no NAME.key file: no client or worker can connect", curve.allow_dir)
        else:
            log.info("CurveZMQ on: %d allowed certificate(s) in %s", len(allowed), curve.allow_dir)
    return curve


def serve_curves(secret: Path | None, allow: Path | None, worker_secret: Path | None) -> tuple[CurveServer | None, CurveClient | None]:
    """(broker, local workers) settings for ``zdepth serve``, or (None, None).

    Paths are made absolute (children restart in the same folder, but logs read better). The workers'
    certificate defaults to the broker's own; its public key must then be allowed, which is checked here
    rather than found out from workers that cannot connect.
    """
    if secret is None:
        if allow is not None or worker_secret is not None:
            raise ConfigError("--curve-allow and --curve-worker-secret need --curve-secret (the broker's NAME.key_secret)")
        return None, None
    secret = secret.expanduser().absolute()
    allow = allow.expanduser().absolute() if allow is not None else None
    server = server_curve(secret, allow)
    worker_file = worker_secret.expanduser().absolute() if worker_secret is not None else secret
    # The workers need the broker's public key: its NAME.key beside the secret, else the secret file itself
    # (a worker reads only the public half of a --curve-server-key file).
    public = public_sibling(secret)
    client = CurveClient(worker_file, public if public.is_file() else secret)
    check_certificates(client)
    if allow is not None:
        worker_key, _ = zmq.auth.load_certificate(worker_file)
        if worker_key not in zmq.auth.load_certificates(allow):
            own = public_sibling(worker_file)
            raise ConfigError(
                f"serve's workers connect with {worker_file}, whose public key is not in --curve-allow {allow}: "
                f"copy {own if own.is_file() else 'its NAME.key'} into {allow}, or pass --curve-worker-secret with an allowed certificate"
            )
    return server, client


def public_sibling(secret_file: Path) -> Path:
    """``NAME.key`` for ``NAME.key_secret``."""
    name = secret_file.name
    return secret_file.with_name(name[: -len("_secret")] if name.endswith(".key_secret") else name + ".key")


@contextlib.contextmanager
def explain_refusal(curve: CurveClient | None) -> Iterator[None]:
    """With CurveZMQ a refused certificate looks exactly like no broker at all: a timeout says so."""
    try:
        yield
    except DeadlineExceeded as exc:
        if curve is None or isinstance(exc, BrokerUnreachable):  # an unreachable broker says so itself
            raise
        raise DeadlineExceeded(
            f"{exc}. With CurveZMQ a refused certificate looks the same: check that {public_sibling(Path(curve.secret_file)).name} "
            f"(the public half of {curve.secret_file}) is in the broker's --curve-allow folder (then restart the broker), "
            f"and that {curve.server_public_file} is the broker's public certificate",
            details=exc.details,
        ) from None
