"""Images given by URL, under the gateway's policy: off unless asked for, and then public addresses only.

Stricter than the client's own fetch (``zdepth.client.urls``), whose pieces it
shares (``shown_url``, ``url_host``, ``read_image``): a gateway that fetches
can be asked to reach anything it can reach, so every hop (the first and each
redirect) is resolved, checked against the policy, and connected to at the
address that was checked, never looked up again.
"""

import base64
import binascii
import http.client
import ipaddress
import math
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Optional

from zdepth.client.urls import MAX_URL_IMAGE_BYTES, URL_SCHEMES, read_image, shown_url, url_host
from zdepth.errors import BadRequest, ConfigError

DEFAULT_URL_TIMEOUT_S = 10.0
MAX_URL_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)


def parse_image_field(text: str) -> "bytes | str":
    """The bytes of a base64 image (plain or a ``data:`` URI), or the URL itself for ``http(s)://``; BadRequest otherwise."""
    head = text[:16].lstrip().lower()
    if head.startswith(("http://", "https://")):
        return text.strip()
    if "://" in head:
        raise BadRequest(f"image URLs must be http:// or https://, got {shown_url(text.strip())}")
    if head.startswith("data:"):
        meta, comma, text = text.partition(",")
        if not comma or ";base64" not in meta.lower():
            raise BadRequest("a data: URI image must be base64 (data:image/jpeg;base64,...)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # base64 wrapped in lines (base64.encodebytes, MIME) is still base64
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("image is neither base64 (of JPEG or PNG bytes) nor an http(s) URL") from None
    if not data:
        raise BadRequest("image is empty")
    return data


@dataclass(frozen=True)
class UrlPolicy:
    """When and how the gateway downloads an image given by URL.

    ``fetch``: off by default, since a gateway that fetches can be asked to
    reach anything it can reach. ``networks``: private networks whose hosts
    may be fetched all the same (any public address may). ``max_bytes`` and
    ``timeout_s`` bound each download, redirects included.
    """

    fetch: bool = False
    networks: tuple[Any, ...] = ()  # ipaddress.IPv4Network / IPv6Network
    max_bytes: int = MAX_URL_IMAGE_BYTES
    timeout_s: float = DEFAULT_URL_TIMEOUT_S
    max_redirects: int = MAX_URL_REDIRECTS

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ConfigError(f"the URL size limit must be at least 1 byte, got {self.max_bytes}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"the URL timeout must be a positive number of seconds, got {self.timeout_s}")

    @staticmethod
    def parse_networks(values: "list[str] | tuple[str, ...]") -> tuple[Any, ...]:
        """CIDR strings (``10.0.5.0/24``, ``127.0.0.1``, ``fd00::/8``) as networks; ConfigError for a bad one."""
        networks = []
        for value in values:
            for item in str(value).replace(",", " ").split():
                try:
                    networks.append(ipaddress.ip_network(item, strict=False))
                except ValueError as exc:
                    raise ConfigError(f"--allow-url-network: {exc}") from None
        return tuple(networks)

    def allows(self, address: Any) -> bool:
        """Whether a resolved address may be connected to: public, or inside one of ``networks``."""
        if any(address.version == net.version and address in net for net in self.networks):
            return True
        return is_public_address(address)


def is_public_address(address: Any) -> bool:
    """A globally routable unicast address: not private, loopback, link-local, multicast, reserved or unspecified
    (IPv4 inside IPv6, as ``::ffff:10.0.0.1``, 6to4 or Teredo, is judged by the IPv4 address it carries too)."""
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return is_public_address(address.ipv4_mapped)
        carried = [address.sixtofour, address.teredo[1] if address.teredo else None]
        if any(inner is not None and not is_public_address(inner) for inner in carried):
            return False
    return address.is_global and not address.is_multicast


def _allowed_addresses(host: str, port: int, policy: UrlPolicy, shown: str) -> list[tuple[int, Any]]:
    """(family, sockaddr) for every address of ``host`` the policy allows; BadRequest when there is none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise BadRequest(f"cannot fetch {shown}: cannot resolve {host}: {exc}", details={"url": shown}) from None
    allowed, refused = [], []
    for family, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        (allowed if policy.allows(address) else refused).append((family, sockaddr, address))
    if not allowed:
        where = refused[0][2] if refused else "nothing"
        raise BadRequest(
            f"cannot fetch {shown}: {host} is {where}, a private, loopback or link-local address, which this gateway does not "
            "fetch from (--allow-url-network lets a network through)",
            details={"url": shown},
        )
    return [(family, sockaddr) for family, sockaddr, _ in allowed]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to an address already checked: connects there, never looking the name up again."""

    def __init__(self, host: str, port: int, addresses: list, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def _open_socket(self) -> socket.socket:
        error: Optional[OSError] = None
        for family, sockaddr in self._addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error if error is not None else OSError("no address to connect to")

    def connect(self) -> None:
        self.sock = self._open_socket()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """HTTPS to an address already checked; the certificate is verified against the host name."""

    default_port = 443

    def __init__(self, host: str, port: int, addresses: list, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, addresses, timeout)
        self._context = context

    def connect(self) -> None:
        self.sock = self._context.wrap_socket(self._open_socket(), server_hostname=self.host)


_TLS_CONTEXT: Optional[ssl.SSLContext] = None


def _tls_context() -> ssl.SSLContext:
    global _TLS_CONTEXT
    if _TLS_CONTEXT is None:
        _TLS_CONTEXT = ssl.create_default_context()
    return _TLS_CONTEXT


def fetch_url(url: str, policy: UrlPolicy) -> bytes:
    """Download an image for a request, within ``policy``; BadRequest says why not.

    Blocking (the app runs it in a thread). Every hop, the first and each
    redirect, is resolved, checked against the policy and connected to at the
    checked address; proxies from the environment are not used. Messages never
    show a URL's query or credentials (signed URLs carry tokens there).
    """
    shown = shown_url(url)
    if not policy.fetch:
        raise BadRequest(
            f"this gateway does not fetch image URLs ({shown}); send the image as base64, "
            "or start the gateway with --allow-url-fetch",
            details={"url": shown},
        )
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for _ in range(policy.max_redirects + 1):
        parts, host, port = url_host(current, shown, schemes=URL_SCHEMES)
        scheme = parts.scheme.lower()
        port = port or (443 if scheme == "https" else 80)
        addresses = _allowed_addresses(host, port, policy, shown)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BadRequest(f"cannot fetch {shown}: no complete answer in {policy.timeout_s:g} s", details={"url": shown})
        if scheme == "https":
            conn: _PinnedHTTPConnection = _PinnedHTTPSConnection(host, port, addresses, remaining, _tls_context())
        else:
            conn = _PinnedHTTPConnection(host, port, addresses, remaining)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "zdepth-gateway"})
            response = conn.getresponse()
            if response.status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise BadRequest(f"cannot fetch {shown}: HTTP {response.status} without a Location", details={"url": shown})
                current = urllib.parse.urljoin(current, location.strip())
                continue
            if response.status != 200:
                raise BadRequest(
                    f"cannot fetch {shown}: HTTP {response.status} {response.reason}", details={"url": shown, "http_status": response.status}
                )
            return read_image(
                response, shown=shown, max_bytes=policy.max_bytes, limit="this gateway's limit", deadline=deadline,
                set_timeout=lambda seconds: conn.sock.settimeout(seconds) if conn.sock is not None else None,
            )
        except socket.timeout:
            raise BadRequest(f"cannot fetch {shown}: no complete answer in {policy.timeout_s:g} s", details={"url": shown}) from None
        except (OSError, http.client.HTTPException) as exc:
            raise BadRequest(f"cannot fetch {shown}: {exc or type(exc).__name__}", details={"url": shown}) from None
        finally:
            conn.close()
    raise BadRequest(f"cannot fetch {shown}: more than {policy.max_redirects} redirects", details={"url": shown})
