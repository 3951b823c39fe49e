"""``zdepth keygen``: CurveZMQ certificate pairs, written where the other commands look for them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from zdepth.errors import ConfigError

from .common import errors, setup_logging
from .options import LogLevel
from .root import command


def default_curve_dir() -> Path:
    """Where ``zdepth keygen`` writes by default: ``$XDG_CONFIG_HOME/zdepth/curve`` or ``~/.config/zdepth/curve``."""
    from zdepth.profiles import config_dir

    return config_dir() / "curve"


@command()
def keygen(
    name: Annotated[str, typer.Argument(help="Certificate name, e.g. broker, robot-3 or gpu-box: writes NAME.key and NAME.key_secret.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--curve-dir",
            "--out",
            "-o",
            envvar="ZDEPTH_CURVE_DIR",
            help="Folder to write to (created, mode 700 if new). Default: ~/.config/zdepth/curve (XDG_CONFIG_HOME honoured).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", envvar="ZDEPTH_FORCE", help="Overwrite an existing certificate of that name.")] = False,
    log_level: LogLevel = None,
) -> None:
    """Create a CurveZMQ certificate pair for the broker, a client or a worker.

    NAME.key is public (copy it freely); NAME.key_secret is secret (mode 600; it never leaves this machine).
    The broker's NAME.key goes to every client and worker (--curve-server-key); each client's and worker's
    NAME.key goes into the broker's --curve-allow folder.
    """
    setup_logging(log_level)
    with errors():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
            raise ConfigError(f"{name!r} is not a certificate name: use letters, digits, '.', '_' and '-' (e.g. robot-3)")
        folder = (out if out is not None else default_curve_dir()).expanduser()
        public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
        if (public.exists() or secret.exists()) and not force:
            raise ConfigError(f"certificate {name} already exists in {folder}; pass --force to replace it (peers holding the old one lose access)")
        from zdepth.protocol.curve import generate

        previous = os.umask(0o077)  # the secret is never readable by others, not even before its chmod
        try:
            public, secret = generate(folder, name)
        except OSError as exc:
            raise ConfigError(f"cannot write certificates into {folder}: {exc.strerror or exc}") from exc
        finally:
            os.umask(previous)
        public.chmod(0o644)  # public: others may read it
    typer.echo(
        f"wrote {public}  (public: copy it where it is needed)\n"
        f"      {secret}  (secret, mode 600: keep it on this machine)\n"
        "\n"
        "As the broker's certificate:\n"
        f"  zdepth broker --curve-secret {secret} --curve-allow ALLOW_DIR\n"
        f"  then give {public.name} to every client and worker (their --curve-server-key).\n"
        "As a client's or a worker's certificate:\n"
        f"  copy {public} into the broker's ALLOW_DIR and restart the broker, then use\n"
        f"  --curve-secret {secret} --curve-server-key BROKER.key\n"
        "  (or curve_secret and curve_server_key in a profile)."
    )
