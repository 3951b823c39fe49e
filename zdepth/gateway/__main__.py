"""``python -m zdepth.gateway``: the same command as ``zdepth gateway``."""

from zdepth.gateway.command import _main

if __name__ == "__main__":
    _main()
