"""Images given by URL: the client downloads them itself, and the gateway shares how a download is read.

The client fetches, never the server: the broker and workers open no
connection on a caller's behalf. The gateway (``zdepth.gateway.urls``) adds
its stricter policy (public addresses only, every hop checked) around the
same pieces: ``shown_url`` for messages, ``url_host`` for the URL's host, and
``read_image`` for the body of an answer.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from zdepth.errors import BadRequest
from zdepth.protocol.codec import DEFAULT_MAX_IMAGE_BYTES

URL_SCHEMES = ("http", "https")
MAX_URL_IMAGE_BYTES = DEFAULT_MAX_IMAGE_BYTES  # what a broker accepts: a bigger download could never be sent
URL_CHUNK_BYTES = 1024 * 1024


def is_url(image: Any) -> bool:
    """A string with a scheme (``https://...``): fetched here if http or https, refused otherwise."""
    return isinstance(image, str) and "://" in image


def shown_url(url: str) -> str:
    """The URL for messages and logs: no user name or password, no query (signed URLs carry tokens there)."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the URL given"
    return f"{parts.scheme}://{host}{port}{parts.path}" + ("?..." if parts.query else "")




def url_host(url: str, shown: str, *, schemes: tuple[str, ...] | None = None) -> tuple[Any, str, int | None]:
    """(urlsplit parts, host, port) of ``url``; BadRequest, naming ``shown``, when it does not parse, its scheme is
    not one of ``schemes`` (when given: ``url`` is a redirect's target), or it names no host."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise BadRequest(f"cannot fetch {shown}: {exc}", details={"url": shown}) from None
    if schemes is not None and parts.scheme.lower() not in schemes:
        raise BadRequest(f"cannot fetch {shown}: it leads to {shown_url(url)}, which is not http or https", details={"url": shown})
    if not host:
        raise BadRequest(f"cannot fetch {shown}: the URL names no host", details={"url": shown})
    return parts, host, port


def read_image(
    response: Any, *, shown: str, max_bytes: int, limit: str, deadline: float, set_timeout: Callable[[float], None] | None = None
) -> bytes:
    """The body of a 200 answer (an ``http.client.HTTPResponse``), read in chunks: at most ``max_bytes``
    (``limit`` says whose limit in the message), by ``deadline`` (``time.monotonic()``; TimeoutError after it).

    ``set_timeout(seconds)``, when given, bounds each read by what is left. A
    text answer (an error page) or an empty one is a BadRequest.
    """
    kind = response.getheader("Content-Type", "") or ""
    if kind.startswith("text/"):
        raise BadRequest(f"cannot fetch {shown}: the server sent {kind.split(';')[0]}, not an image", details={"url": shown})
    too_big = f"cannot fetch {shown}: the image is larger than {max_bytes} bytes, {limit}"
    length = (response.getheader("Content-Length", "") or "").strip()
    if length.isdigit() and int(length) > max_bytes:
        raise BadRequest(too_big, details={"url": shown})
    chunks, total = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if set_timeout is not None:
            set_timeout(remaining)
        chunk = response.read(min(URL_CHUNK_BYTES, max_bytes + 1 - total))
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise BadRequest(too_big, details={"url": shown})
        chunks.append(chunk)
    if not total:
        raise BadRequest(f"cannot fetch {shown}: the server sent no bytes", details={"url": shown})
    return b"".join(chunks)


def fetch_image(url: str, *, timeout: float, max_bytes: int = MAX_URL_IMAGE_BYTES) -> bytes:
    """Download an image by ``http://`` or ``https://`` URL, as the old HTTP server took them; BadRequest says why not.

    At most ``max_bytes`` (64 MiB, the largest image a broker accepts) are
    read; the download gives up after ``timeout`` seconds (checked between
    reads; each read waits at most that long too). Redirects are followed only
    to http and https; any other scheme (``file://``, ``ftp://``, ...) is refused.
    """
    import urllib.error
    import urllib.request

    shown = shown_url(url)
    scheme = url.partition("://")[0].lower()
    if scheme not in URL_SCHEMES:
        raise BadRequest(
            f"cannot fetch {shown}: only http:// and https:// images are fetched; for a local file give its path",
            details={"url": shown},
        )
    url_host(url, shown)

    class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
            if newurl.partition("://")[0].lower() not in URL_SCHEMES:
                raise BadRequest(f"cannot fetch {shown}: it redirects to {shown_url(newurl)}, which is not http or https", details={"url": shown})
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"Accept": "image/*", "User-Agent": "zdepth-client"})
    deadline = time.monotonic() + timeout
    try:
        with opener.open(request, timeout=timeout) as response:
            return read_image(response, shown=shown, max_bytes=max_bytes, limit="the most a broker accepts", deadline=deadline)
    except urllib.error.HTTPError as exc:
        raise BadRequest(f"cannot fetch {shown}: HTTP {exc.code} {exc.reason}", details={"url": shown, "http_status": exc.code}) from None
    except TimeoutError:
        raise BadRequest(f"cannot fetch {shown}: no complete answer in {timeout:g} s", details={"url": shown}) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise BadRequest(f"cannot fetch {shown}: no answer in {timeout:g} s", details={"url": shown}) from None
        raise BadRequest(f"cannot fetch {shown}: {reason}", details={"url": shown}) from None
    except OSError as exc:  # the connection broke mid-way
        raise BadRequest(f"cannot fetch {shown}: {exc}", details={"url": shown}) from None
