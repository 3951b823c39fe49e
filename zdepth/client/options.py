"""What a client is given: its broker addresses (or a profile), and which defaults the caller left unchosen.

A profile fills in only what the caller did not choose, so a constructor
default has to be told apart from the same value written out: the defaults
here are marked (``_Unchosen``) for that.
"""

from __future__ import annotations

import enum
from typing import Any, Sequence

from zdepth import models
from zdepth.errors import ConfigError

DEFAULT_ADDRESS = "tcp://localhost:5555"


class ClientState(enum.Enum):
    """``UNOPENED`` until the first request (or ``with``), ``OPENED`` with a socket, ``CLOSED`` for good."""

    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


def resolve_addresses(address: str | Sequence[str]) -> tuple[tuple[str, ...], Any]:
    """(broker endpoints in order of preference, the profile or None) for what a caller gave as the server.

    One string without a comma is an address or a profile name, by the
    command line's rules (``zdepth.profiles.resolve_server``); a profile may
    name several brokers. A comma-separated string (``"a:5555,b:5555"``) or a
    list names several brokers, each an address (a profile name there would
    leave open whose key and model apply). ConfigError, one line, otherwise.
    """
    from zdepth.addresses import looks_like_address, normalize_address
    from zdepth.profiles import resolve_server

    if isinstance(address, str):
        parts = address.split(",")
    elif isinstance(address, (list, tuple)) and address and all(isinstance(item, str) for item in address):
        parts = [part for item in address for part in item.split(",")]
    else:
        raise ConfigError(
            f"give the broker as an address string, a profile name or a list of addresses, got {type(address).__name__} {address!r}"
        )
    parts = [part.strip() for part in parts]
    if len(parts) == 1:
        endpoint, profile = resolve_server(parts[0])
        several = profile.addresses if profile is not None else None
        return (tuple(several) if several else tuple(endpoint.split(","))), profile
    endpoints: list[str] = []
    for part in parts:
        if not part:
            raise ConfigError(f"{address!r} holds an empty address; separate brokers with one comma: tcp://a:5555,tcp://b:5555")
        if not looks_like_address(part):
            raise ConfigError(
                f"{part!r} in a list of brokers is not an address: give each as HOST:PORT or tcp://HOST:PORT "
                "(a profile names its brokers with addresses = [...])"
            )
        endpoint = normalize_address(part)
        if endpoint in endpoints:
            raise ConfigError(f"{address!r} names the broker {endpoint} twice")
        endpoints.append(endpoint)
    return tuple(endpoints), None


class _Unchosen:
    """Marks a constructor default the caller did not choose, so a profile's own value may take its place.

    The defaults below are instances of float and str subclasses: they print
    and compare as the plain values, and an argument the caller wrote, even
    the same value, is a plain float or str.
    """

    __slots__ = ()


class _UnchosenFloat(_Unchosen, float):
    __slots__ = ()


class _UnchosenStr(_Unchosen, str):
    __slots__ = ()


DEFAULT_TIMEOUT = _UnchosenFloat(30.0)
DEFAULT_ENCODER = _UnchosenStr(models.DEFAULT_ENCODER)
_DEFAULT_DATASET = _UnchosenStr(models.DEFAULT_DATASET)
