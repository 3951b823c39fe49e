"""The ``zdepth`` group every command registers with (``@command()``), and its own options."""

from __future__ import annotations

import functools
from typing import Annotated, Any

import typer

from zdepth import __version__

from .common import set_default_log_level
from .options import LogLevel


class _PlainFlags:
    """Flags show no value placeholder in --help (they take none); mixed into the command and group classes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, typer.core.TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_PlainFlags, typer.core.TyperCommand):
    """A command whose flags show no value placeholder."""


class _Group(_PlainFlags, typer.core.TyperGroup):
    """The top-level command, flags likewise."""


app = typer.Typer(
    name="zdepth",
    cls=_Group,
    help="Depth Anything V2 over ZeroMQ: a broker, one worker per GPU, and clients.\n\n"
    "On a GPU box: `zdepth serve`. Anywhere: `zdepth predict photos/ --out depth/`, `zdepth health`.\n\n"
    "Every option also comes from an environment variable: ZDEPTH_ and its name, dashes as underscores "
    "(--weights-dir: ZDEPTH_WEIGHTS_DIR); the command line wins. For predict, health and bench, a profile "
    "named by --server beats the environment. Exit status: 0 done, 1 failed, 2 bad option or setting, "
    "3 checkpoint or torch missing, 4 address cannot be bound.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
command = functools.partial(app.command, cls=_Command)


def _version(shown: bool) -> None:
    if shown:
        typer.echo(f"zdepth {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    log_level: LogLevel = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Depth Anything V2 over ZeroMQ: a broker, one worker per GPU, and clients."""  # the help shown is app's
    set_default_log_level(log_level)
