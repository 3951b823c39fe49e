"""What every command shares: logging set up once, errors as one line and an exit status, and
settings resolved in the command line's words.

Public so that other commands (``zdepth gateway``) behave the same: ``setup_logging``,
``errors`` and ``resolve_target``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from zdepth.errors import ConfigError, ZdepthError
from zdepth.exits import EXIT_MISSING
from zdepth.profiles import Target

from .options import DEFAULT_SERVER, LOG_LEVELS, value

__all__ = ["TORCH_HINT", "address", "cli_words", "errors", "log_level_name", "missing_torch", "resolve_target", "set_default_log_level", "setup_logging"]

logger = logging.getLogger("zdepth.cli")

TORCH_HINT = 'pip install "zdepth[worker]" (in a clone of the repository: pip install -e ".[worker]")'


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_default_log_level: Any = None  # `zdepth --log-level X COMMAND`: for every command that names none


def set_default_log_level(level: Any) -> None:
    """The top-level --log-level, which a command's own --log-level overrides."""
    global _default_log_level
    _default_log_level = level


def log_level_name(level: Any, default: str = "info") -> str:
    """The level in force: the command's, else the top-level one, else ``default``."""
    return str(value(level) or value(_default_log_level) or default).lower()


def setup_logging(level: Any, default: str = "info") -> None:
    """One stderr handler on the root logger (replacing ours from an earlier call), ``zdepth.*`` at ``level``."""
    name = log_level_name(level, default)
    if name not in LOG_LEVELS:
        raise typer.BadParameter(f"{level!r} is not one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    logging.getLogger("zdepth").setLevel(name.upper())


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Our errors as one readable line and an exit status that says whether trying again can help.

    2 for bad settings, 3 for a missing checkpoint or torch, 1 for other failures
    (see zdepth.supervisor: ``serve`` restarts a child only after the last kind).
    """
    from zdepth.errors import WeightsNotFound
    from zdepth.exits import EXIT_CONFIG, EXIT_FAILURE

    try:
        yield
    except ConfigError as exc:
        typer.echo(f"error: {cli_words(str(exc))}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except WeightsNotFound as exc:
        typer.echo(f"error: {cli_words(str(exc))}", err=True)
        raise typer.Exit(EXIT_MISSING) from None
    except ZdepthError as exc:
        typer.echo(f"error: {cli_words(str(exc))}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    except ValueError as exc:  # the engine's refusals of settings (a CUDA device without CUDA, fp16 on the CPU, ...)
        logger.debug("details", exc_info=True)
        typer.echo(f"error: {cli_words(str(exc))}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("torch", "torchvision"):
            raise
        typer.echo(f"error: {missing_torch(exc.name)}", err=True)
        raise typer.Exit(EXIT_MISSING) from None


def missing_torch(name: str | None = "torch") -> str:
    return f"running the model needs {name or 'torch'}, which is not installed: {TORCH_HINT}"


# Library messages name Python arguments; on the command line the options are what a user can change.
_API_ARGUMENTS = ("timeout", "retries", "key_file", "key", "device", "precision", "download", "max_depth", "input_size", "weights_dir", "intrinsics")
_API_ARGUMENT = re.compile(
    rf"(?<![\w.-])({'|'.join(_API_ARGUMENTS)})=(?:'([^']*)'|\"([^\"]*)\"|(True)\b|(?=[\s,.;)]|$))"
)


def cli_words(message: str) -> str:
    """``message`` as the CLI says it: ``timeout=`` becomes ``--timeout``, ``device='cpu'`` ``--device cpu``;
    asides meant for Python callers only (``(... in Python)``) are dropped."""
    message = re.sub(r"\s*\([^()]*\bin Python\)", "", message)

    def option(match: re.Match[str]) -> str:
        name, given = match.group(1), match.group(2) if match.group(2) is not None else match.group(3)
        flag = "--" + name.replace("_", "-")
        return f"{flag} {given}" if given else flag

    return _API_ARGUMENT.sub(option, message)


def address(text: str, option: str, *, bind: bool = False) -> str:
    """An address option as a ZeroMQ endpoint; ConfigError (exit 2) naming the option and the accepted forms."""
    from zdepth.addresses import normalize_address

    try:
        return normalize_address(text, bind=bind)
    except ConfigError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def _source(ctx: typer.Context, name: str) -> str | None:
    """Where option ``name`` got its value (COMMANDLINE, ENVIRONMENT, DEFAULT, ...); None for a command without it.

    By name: typer carries its own copy of click, whose ParameterSource is not public.
    """
    source = ctx.get_parameter_source(name)
    return None if source is None else source.name


_TARGET_SETTINGS = ("key", "key_file", "curve_secret", "curve_server_key", "timeout", "model")


def resolve_target(
    ctx: typer.Context | None,
    server: str | None,
    *,
    key: str | None = None,
    key_file: Path | None = None,
    curve_secret: Path | None = None,
    curve_server_key: Path | None = None,
    timeout: float | None = None,
    model: str | None = None,
) -> Target:
    """``--server`` (an address or a profile; default tcp://localhost:5555) with its key, model, timeout and certificates.

    ``ctx`` tells a setting typed on the command line (beats the profile's) from one taken from its
    ZDEPTH_* variable (loses to it); see ``zdepth.profiles.resolve_target``.
    """
    from zdepth.profiles import resolve_target as resolve

    from_environment = {name for name in _TARGET_SETTINGS if ctx is not None and _source(ctx, name) == "ENVIRONMENT"}
    return resolve(
        server if server is not None else DEFAULT_SERVER,
        key=key,
        key_file=key_file,
        curve_secret=curve_secret,
        curve_server_key=curve_server_key,
        timeout=timeout,
        model=model,
        from_environment=from_environment,
        where="--server",
    )
