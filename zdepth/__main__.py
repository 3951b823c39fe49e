"""``python -m zdepth``: the same as the ``zdepth`` command (serve starts its children this way)."""

from zdepth.cli import app

if __name__ == "__main__":
    app(prog_name="zdepth")
