"""The ``zdepth`` command: broker, worker, serve, keygen, predict, health, bench and gateway.

Thin on purpose: options (and their ``ZDEPTH_*`` environment variables) become
the config dataclasses, then a library call does the work. Logging is
configured here and nowhere else. Importing this package imports no torch (nor
the broker, worker or client): each command imports what it needs when it runs,
and the in-process ``predict`` path imports the engine only then.

Keys never need to be on a command line, where ``ps`` shows them: every
command reads ``ZDEPTH_KEY``, or the file named by ``--key-file`` or
``ZDEPTH_KEY_FILE``. ``--key`` exists for quick tests.

CurveZMQ (``zdepth.protocol.curve``) is optional: ``zdepth keygen NAME`` writes a
certificate pair; the broker takes ``--curve-secret`` and ``--curve-allow``,
workers and client commands ``--curve-secret`` and ``--curve-server-key``.
Only file paths travel on command lines, never key material.

Layout: ``root`` (the group), ``options`` (options shared by several commands),
``common`` (logging, errors, ``--server``), ``serving`` (broker, worker, serve),
``keys`` (keygen), ``client_commands`` (predict, health, bench), ``tables``
(what they print). Commands are listed in --help in the order registered here.
"""

from __future__ import annotations

from .client_commands import bench, health, predict, resolve_server
from .common import setup_logging
from .keys import default_curve_dir, keygen
from .options import Colormap
from .root import app, main
from .serving import broker, serve, worker  # registers them, in this order
from .tables import format_bench, format_health

__all__ = [
    "Colormap",
    "app",
    "bench",
    "broker",
    "default_curve_dir",
    "format_bench",
    "format_health",
    "health",
    "keygen",
    "main",
    "predict",
    "resolve_server",
    "serve",
    "setup_logging",
    "worker",
]

from zdepth.gateway import gateway_command  # noqa: E402  (FastAPI is imported only when the command runs)

from .root import command  # noqa: E402

command("gateway")(gateway_command)
