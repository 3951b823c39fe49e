"""Images by URL: the client downloads http(s) images itself (size limit, timeout, clear errors); the server never fetches.

A real HTTP server on a loopback port serves the photos, errors, slow and huge answers.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
import time

import cv2
import numpy as np
import pytest

from test_client import INTRINSICS, fake_depth, serve  # noqa: F401  (serve is a fixture)
from zdepth import AsyncClient, Client
from zdepth.client.urls import fetch_image
from zdepth.errors import BadRequest
from zdepth.pointcloud import depth_to_points
from zdepth.protocol.images import decode_image

pytestmark = pytest.mark.timeout(60)

IMAGE = np.random.default_rng(7).integers(0, 256, (24, 32, 3), dtype=np.uint8)
PNG = cv2.imencode(".png", IMAGE)[1].tobytes()


class Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        Handler.hits[path] = Handler.hits.get(path, 0) + 1
        if path == "/photo.png":
            self._send(200, PNG, "image/png")
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/photo.png")
            self.end_headers()
        elif path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/photo.png")
            self.end_headers()
        elif path == "/page":
            self._send(200, b"<html>not here</html>", "text/html; charset=utf-8")
        elif path == "/huge-header":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(100 * 1024 * 1024))
            self.end_headers()
        elif path == "/endless":  # no Content-Length: the limit is found while reading
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\xff" * 4096)
            except OSError:
                pass
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, PNG, "image/png")
        else:
            self._send(404, b"nothing", "text/plain")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up first (the timeout test)
            pass


@pytest.fixture(scope="module")
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_url_is_fetched_by_the_client_and_sent_as_bytes(serve, web):
    server = serve()
    with Client(server.address) as client:
        result = client.relative_depth(f"{web}/photo.png?sig=secret")
        redirected = client.metric_depth(f"{web}/redirect")
    for rec in server.requests:
        assert rec.params.image == {"format": "encoded"} and bytes(rec.image) == PNG  # the server gets the image, not a URL
    np.testing.assert_array_equal(result.depth, fake_depth(IMAGE))
    np.testing.assert_array_equal(redirected.depth, fake_depth(IMAGE))


def test_a_point_cloud_from_a_url_fetches_it_once(serve, web):
    server = serve()
    before = Handler.hits.get("/photo.png", 0)
    with Client(server.address) as client:
        cloud = client.pointcloud(f"{web}/photo.png", INTRINSICS)
    assert Handler.hits["/photo.png"] == before + 1  # colours come from the same download
    points, rgb = depth_to_points(fake_depth(decode_image(PNG)), INTRINSICS, colors=IMAGE)
    np.testing.assert_array_equal(cloud.points, points)
    np.testing.assert_array_equal(cloud.colors, rgb)


def test_async_client_and_streams_take_urls(serve, web):
    server = serve()

    async def main():
        async with AsyncClient(server.address) as client:
            one = await client.relative_depth(f"{web}/photo.png")
            many = [r async for r in client.stream([f"{web}/photo.png", IMAGE], max_in_flight=2)]
            return one, many

    one, many = asyncio.run(main())
    np.testing.assert_array_equal(one.depth, fake_depth(IMAGE))
    assert [r.index for r in many] == [0, 1]
    with Client(server.address) as client:
        assert [r.index for r in client.stream([f"{web}/photo.png"] * 2)] == [0, 1]


@pytest.mark.parametrize(
    "path, message",
    [
        ("/missing.jpg", "HTTP 404"),
        ("/page", "sent text/html, not an image"),
        ("/huge-header", "larger than"),
        ("/to-ftp", "redirects to ftp://127.0.0.1/photo.png, which is not http or https"),
        ("/to-file", "Redirection to url 'file:///etc/passwd' is not allowed"),
    ],
)
def test_what_cannot_be_fetched_says_why(serve, web, path, message):
    server = serve()
    with Client(server.address) as client:
        with pytest.raises(BadRequest, match=message) as info:
            client.relative_depth(f"{web}{path}?token=abc")
    assert f"{web}{path}?..." in str(info.value) and "abc" not in str(info.value)  # no query: it may hold a token
    assert server.requests == []


def test_the_size_limit_holds_without_a_content_length(web):
    with pytest.raises(BadRequest, match="larger than 100000 bytes"):
        fetch_image(f"{web}/endless", timeout=5, max_bytes=100_000)


def test_a_slow_server_times_out(serve, web):
    server = serve()
    start = time.monotonic()
    with Client(server.address, timeout=0.5) as client:
        with pytest.raises(BadRequest, match=r"no answer in 0.5 s|no complete answer in 0.5 s"):
            client.relative_depth(f"{web}/slow")
    assert time.monotonic() - start < 1.4


@pytest.mark.parametrize(
    "url, message",
    [
        ("file:///etc/hostname", "only http:// and https:// images are fetched"),
        ("ftp://example.org/a.jpg", "only http:// and https:// images are fetched"),
        ("https://user:pw@/a.jpg", "names no host"),
    ],
)
def test_other_schemes_are_refused_without_a_connection(serve, url, message):
    server = serve()
    with Client(server.address) as client:
        with pytest.raises(BadRequest, match=message) as info:
            client.relative_depth(url)
    assert "pw" not in str(info.value)
    assert server.requests == []
