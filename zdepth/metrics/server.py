"""The HTTP exporter: one registry served at ``http://host:port/metrics`` on a daemon thread."""

from __future__ import annotations

import errno as errno_codes
import threading
from typing import Any

from zdepth.errors import ConfigError
from zdepth.metrics.common import log, prometheus

DEFAULT_HOST = "0.0.0.0"


class MetricsBindError(OSError):
    """The metrics port cannot be bound (the CLI exits 4 for it, as for a ZeroMQ endpoint in use)."""


class MetricsServer:
    """The HTTP exporter of one registry, on its own daemon thread; ``close()`` stops it and frees the port."""

    def __init__(self, server: Any, thread: threading.Thread, host: str) -> None:
        self._server, self._thread = server, thread
        self.host = host
        self.port: int = server.server_address[1]

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("localhost" if self.host == "::" else self.host)
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(port: int, registry: Any, host: str = DEFAULT_HOST) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0: any free port, see ``.port``).

    A port that cannot be bound raises MetricsBindError (an OSError) naming
    it; a port out of range raises ConfigError.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"metrics port must be an integer in 0..65535, got {port!r}")
    prometheus_client = prometheus()
    try:
        server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        hint = " (is another broker or worker serving metrics there? choose another --metrics-port)" if exc.errno == errno_codes.EADDRINUSE else ""
        error = MetricsBindError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}{hint}")
        error.errno = exc.errno
        raise error from None
    served = MetricsServer(server, thread, host)
    log.info("metrics at http://%s:%d/metrics", host, served.port)
    return served
