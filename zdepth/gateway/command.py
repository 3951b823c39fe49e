"""Running the gateway: ``run_gateway`` (uvicorn on a socket bound first) and the ``zdepth gateway`` command.

``python -m zdepth.gateway`` runs the same command (``__main__``).
"""

import importlib
import logging
import signal
import socket
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zdepth.client.urls import MAX_URL_IMAGE_BYTES
from zdepth.errors import ConfigError
from zdepth.gateway.app import DEFAULT_BROKER, DEFAULT_TIMEOUT_S, MAX_BODY_BYTES, GatewaySettings, create_app
from zdepth.gateway.urls import DEFAULT_URL_TIMEOUT_S, UrlPolicy

log = logging.getLogger("zdepth.gateway")

DEFAULT_HOST = "0.0.0.0"  # the old server's default: the gateway is there to be reached from the lab
DEFAULT_PORT = 8000
GATEWAY_EXTRA_HINT = 'pip install "zdepth[gateway]" (in a clone of the repository: pip install -e ".[gateway]")'


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a port in use is reported as such (exit 4)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def run_gateway(
    broker: str = DEFAULT_BROKER,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    key: Optional[str] = None,
    curve: Any = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    retries: int = 1,
    urls: Optional[UrlPolicy] = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    log_level: str = "info",
    access_log: bool = True,
    sock: Optional[socket.socket] = None,
) -> None:
    """Serve the old HTTP API on ``host:port`` (or on ``sock``, already listening) in front of ``broker``
    until SIGINT or SIGTERM.

    Raises OSError when the address cannot be bound and ModuleNotFoundError
    without the ``gateway`` extra.
    """
    import uvicorn

    settings = GatewaySettings(broker=broker, key=key, curve=curve, timeout=timeout, retries=retries, urls=urls or UrlPolicy(), max_body_bytes=max_body_bytes)
    app = create_app(settings)
    if sock is None:
        sock = _bind(host, port)
    bound = sock.getsockname()
    shown_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    log.info("zdepth gateway listening on http://%s:%d (API docs at /docs)", shown_host, bound[1])
    config = uvicorn.Config(app, log_config=None, log_level=log_level.lower(), access_log=access_log, loop="asyncio", lifespan="on")
    stopped = []
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler it found;
    # with ours in place a requested stop ends the command with status 0, like every other zdepth server.
    previous = {sig: signal.signal(sig, lambda signum, _frame: stopped.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)} if threading.current_thread() is threading.main_thread() else {}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        log.info("gateway stopped (%s)", signal.Signals(stopped[0]).name)


GatewayBroker = Annotated[
    str,
    typer.Option(
        "--server",
        "--broker",
        envvar="ZDEPTH_SERVER",
        help="The broker's client endpoint (tcp://HOST:5555, HOST:5555) or a profile name, as for predict and health.",
    ),
]


def gateway_command(
    ctx: typer.Context,
    broker: GatewayBroker = DEFAULT_BROKER,
    host: Annotated[str, typer.Option("--host", envvar="ZDEPTH_HOST", help="Address to listen on (0.0.0.0: every interface).")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", envvar="ZDEPTH_PORT", min=0, max=65535, help="HTTP port (0: any free one, logged).")] = DEFAULT_PORT,
    key: Annotated[
        Optional[str],
        typer.Option("--key", envvar="ZDEPTH_KEY", help="The broker's key, also the bearer key HTTP callers send. Prefer ZDEPTH_KEY or --key-file: `ps` shows command lines.", show_default=False),
    ] = None,
    key_file: Annotated[Optional[Path], typer.Option("--key-file", envvar="ZDEPTH_KEY_FILE", help="File holding the shared secret.", show_default=False)] = None,
    curve_secret: Annotated[
        Optional[Path],
        typer.Option("--curve-secret", envvar="ZDEPTH_CURVE_SECRET", help="CurveZMQ: this machine's NAME.key_secret, for a broker that encrypts. Needs --curve-server-key.", show_default=False),
    ] = None,
    curve_server_key: Annotated[
        Optional[Path],
        typer.Option("--curve-server-key", envvar="ZDEPTH_CURVE_SERVER_KEY", help="CurveZMQ: the broker's public NAME.key. Needs --curve-secret.", show_default=False),
    ] = None,
    timeout: Annotated[
        Optional[float],
        typer.Option("--timeout", envvar="ZDEPTH_TIMEOUT", min=0.001, help="Seconds per attempt at the broker. Default: the profile's, else 30.", show_default=False),
    ] = None,
    retries: Annotated[int, typer.Option("--retries", envvar="ZDEPTH_RETRIES", min=0, help="Resends of a request whose attempt got no reply.")] = 1,
    allow_url_fetch: Annotated[
        bool,
        typer.Option("--allow-url-fetch/--no-allow-url-fetch", envvar="ZDEPTH_ALLOW_URL_FETCH", help="Download images given by http(s) URL (public addresses only)."),
    ] = False,
    allow_url_network: Annotated[
        Optional[list[str]],
        typer.Option(
            "--allow-url-network",
            envvar="ZDEPTH_ALLOW_URL_NETWORK",
            help="With --allow-url-fetch: a private network (CIDR) whose hosts may be fetched from too, e.g. the lab's camera host 10.0.5.0/24, "
            "or 127.0.0.0/8 to try it on one machine. Repeatable.",
            show_default=False,
        ),
    ] = None,
    url_max_bytes: Annotated[int, typer.Option("--url-max-bytes", envvar="ZDEPTH_URL_MAX_BYTES", min=1, help="Largest image downloaded by URL.")] = MAX_URL_IMAGE_BYTES,
    url_timeout: Annotated[float, typer.Option("--url-timeout", envvar="ZDEPTH_URL_TIMEOUT", min=0.001, help="Seconds for one download, redirects included.")] = DEFAULT_URL_TIMEOUT_S,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", envvar="ZDEPTH_ACCESS_LOG", help="A log line per HTTP request (at info).")] = True,
    log_level: Annotated[
        Optional[str],
        typer.Option("--log-level", envvar="ZDEPTH_LOG_LEVEL", help="How much to log (to stderr): debug, info, warning, error. Default: info.", show_default=False),
    ] = None,
) -> None:
    """Serve the old HTTP depth API (/pc, /metric_depth, /rel_depth, /health; Bearer key) in front of a broker."""
    from zdepth.cli.common import errors, resolve_target, setup_logging
    from zdepth.exits import EXIT_ADDRESS, EXIT_MISSING

    setup_logging(log_level)
    level = (log_level or "info").lower()
    with errors():
        try:
            target = resolve_target(ctx, broker, key=key, key_file=key_file, curve_secret=curve_secret, curve_server_key=curve_server_key, timeout=timeout)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("--server", "--broker")) from None
        networks = UrlPolicy.parse_networks(allow_url_network or [])
        if networks and not allow_url_fetch:
            raise ConfigError("--allow-url-network only matters with --allow-url-fetch")
        urls = UrlPolicy(fetch=allow_url_fetch, networks=networks, max_bytes=url_max_bytes, timeout_s=url_timeout)
        try:
            for extra in ("fastapi", "uvicorn"):  # the gateway extra, checked before anything is bound
                importlib.import_module(extra)
        except ModuleNotFoundError as exc:
            typer.echo(f"error: the gateway needs {exc.name}, which is not installed: {GATEWAY_EXTRA_HINT}", err=True)
            raise typer.Exit(EXIT_MISSING) from None
        try:
            sock = _bind(host, port)
        except OSError as exc:
            typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc} (--host, --port)", err=True)
            raise typer.Exit(EXIT_ADDRESS) from None
        run_gateway(
            target.address,
            key=target.key,
            curve=target.curve,
            timeout=target.timeout or DEFAULT_TIMEOUT_S,
            retries=retries,
            urls=urls,
            log_level=level,
            access_log=access_log,
            sock=sock,
        )


def _main() -> None:
    """``python -m zdepth.gateway``: the same command as ``zdepth gateway``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})
    app.command()(gateway_command)
    app(prog_name="zdepth gateway")
