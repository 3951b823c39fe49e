"""Exit statuses, the same for every ``zdepth`` command, so that scripts and ``serve`` tell a crash
(worth a restart) from a setting to fix (not worth one)."""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FAILURE = 1  # something failed that may work next time (a crash, a broker gone for good, ...)
EXIT_CONFIG = 2  # a bad option or setting (also what click uses for usage errors): fix the command line
EXIT_MISSING = 3  # a checkpoint (after any download attempt) or torch is missing: install or fetch it
EXIT_ADDRESS = 4  # an address cannot be bound, usually a port in use: another broker or serve runs there
EXIT_INTERRUPTED = 130
PERMANENT_EXITS: dict[int, str] = {
    EXIT_CONFIG: "a bad option or setting",
    EXIT_MISSING: "a checkpoint or torch is missing",
    EXIT_ADDRESS: "an address cannot be bound (a port in use?)",
}


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
