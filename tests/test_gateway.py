"""The old HTTP API as a gateway: real broker, CPU worker and gateway processes, driven the way the old
server's README shows (requests, JSON, base64), compared number for number with zdepth.Client.

Also: the bearer key (checked before the body is read, compared in constant time), images by URL
(refused unless the gateway fetches, private addresses refused hop by hop, size and time limits), and
how zdepth's errors become HTTP statuses.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import ipaddress
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from procs import Proc, child_env, free_port, small_image, spawn, start_live_server
from zdepth import Client
from zdepth.errors import BadRequest, BrokerUnreachable, error_from_code
from zdepth.gateway import MAX_BODY_BYTES, UrlPolicy, fetch_url, http_status, is_public_address, key_digest, key_matches, token_matches

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

KEY = "gateway-test-key"
SIZE = 28  # network input size: tiny, so the CPU keeps up
INTRINSICS = {"fx": 80.0, "fy": 82.0, "cx": 47.5, "cy": 31.5}
URL_LIMIT = 200_000


# ----------------------------------------------------------------------------- the old server's client, as its README shows


def encode_image(path) -> str:
    with open(path, "rb") as image_file:
        return base64.b64encode(image_file.read()).decode("utf-8")


def decode_depth_map(depth_base64: str, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(depth_base64), dtype=np.float32).reshape(shape)


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def post(base_url: str, path: str, payload: dict, api_key: str | None = KEY) -> requests.Response:
    return requests.post(f"{base_url}{path}", json=payload, headers=_headers(api_key), timeout=60)


def predict(base_url: str, path: str, image: str, **fields) -> dict:
    payload = {"image": image, "encoder": "vits", "dataset": "hypersim", "model_input_size": SIZE, **fields}
    response = post(base_url, path, payload)
    assert response.status_code == 200, response.text
    return response.json()


# ----------------------------------------------------------------------------- processes


def start_gateway(tmp: Path, broker: str, *args: str, key: str | None = KEY, name: str = "gateway") -> tuple[Proc, str]:
    """``python -m zdepth.gateway`` on a free loopback port; returns it once /health answers at all."""
    port = free_port()
    env = child_env(None, ZDEPTH_KEY=key)
    argv = [sys.executable, "-m", "zdepth.gateway", "--broker", broker, "--host", "127.0.0.1", "--port", str(port), "--log-level", "debug", *args]
    proc = spawn(argv, tmp / f"{name}.log", env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"the gateway exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            requests.get(f"{base_url}/health", timeout=10)
            return proc, base_url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.stop()
    raise AssertionError(f"the gateway did not answer within 60 s:\n{proc.tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, weights_dir):
    live = start_live_server(tmp_path_factory.mktemp("gateway-serving"), weights_dir, models=("vits", "vits-hypersim"), key=KEY)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    proc, base_url = start_gateway(tmp_path_factory.mktemp("gateway"), server.client_address)
    yield base_url
    proc.stop()


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> Path:
    return small_image(tmp_path_factory.mktemp("frame") / "frame.jpg", "demo04.jpg", (96, 64))


@pytest.fixture(scope="module")
def client(server):
    with Client(server.client_address, key=KEY, timeout=60, input_size=SIZE, encoder="vits", dataset="hypersim") as c:
        yield c


# ----------------------------------------------------------------------------- the same numbers as zdepth.Client


def test_each_endpoint_gives_the_clients_numbers_in_the_old_shapes(gateway, client, frame):
    image = encode_image(frame)
    data = frame.read_bytes()

    rel = predict(gateway, "/rel_depth", image)
    assert set(rel) == {"depth_map", "shape", "min", "max"} and rel["shape"] == [64, 96]
    expected = client.legacy_relative_depth(data)
    depth = decode_depth_map(rel["depth_map"], rel["shape"])
    assert depth.std() > 0, "a constant depth map would make the comparison vacuous"
    np.testing.assert_allclose(depth, expected.depth, rtol=1e-5, atol=1e-6)
    assert rel["min"] == pytest.approx(expected.min, rel=1e-5) and rel["max"] == pytest.approx(expected.max, rel=1e-5)
    assert 0 <= rel["min"] <= rel["max"] <= 1.0, "the old /rel_depth is metric depth scaled into 0..1"

    metric = predict(gateway, "/metric_depth", image, max_depth=20.0)
    assert set(metric) == {"depth_map", "shape", "min", "max"} and metric["shape"] == [64, 96]
    expected_metric = client.metric_depth(data, max_depth=20.0)
    np.testing.assert_allclose(decode_depth_map(metric["depth_map"], metric["shape"]), expected_metric.depth, rtol=1e-5, atol=1e-5)
    assert metric["max"] == pytest.approx(expected_metric.max, rel=1e-5) and metric["max"] > 1.0

    pc = predict(gateway, "/pc", image, camera_intrinsics=INTRINSICS, max_depth=20.0)
    assert list(pc) == ["pointcloud", "pointcloud_shape", "depth_map", "depth_shape", "min", "max"]
    assert pc["pointcloud_shape"] == [64 * 96, 3] and pc["depth_shape"] == [64, 96]
    expected_pc = client.pointcloud(data, INTRINSICS, max_depth=20.0, colors=False)
    points = np.frombuffer(base64.b64decode(pc["pointcloud"]), dtype=np.float32).reshape(pc["pointcloud_shape"])
    np.testing.assert_allclose(points, expected_pc.points, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decode_depth_map(pc["depth_map"], pc["depth_shape"]), expected_pc.depth.depth, rtol=1e-5, atol=1e-5)
    assert pc["min"] == pytest.approx(expected_pc.depth.min, rel=1e-5)


def test_rel_depth_keeps_the_old_meaning_and_max_depth_defaults_to_one(gateway, client, frame):
    image = encode_image(frame)
    legacy = client.legacy_relative_depth(frame.read_bytes()).depth
    # /rel_depth ignores a max_depth it is sent, as the old server did: always the metric model at 1.0.
    rel = predict(gateway, "/rel_depth", image, max_depth=50.0)
    np.testing.assert_allclose(decode_depth_map(rel["depth_map"], rel["shape"]), legacy, rtol=1e-5, atol=1e-6)
    # The relative model gives other numbers: the gateway did not quietly swap models.
    relative = client.relative_depth(frame.read_bytes()).depth
    assert not np.allclose(relative, legacy, rtol=1e-2)
    # /metric_depth without max_depth is scaled by 1.0, as the old server and its client did.
    metric = predict(gateway, "/metric_depth", image)
    np.testing.assert_allclose(decode_depth_map(metric["depth_map"], metric["shape"]), legacy, rtol=1e-5, atol=1e-6)
    # Base64 in lines and data: URIs are base64 too.
    wrapped = base64.encodebytes(frame.read_bytes()).decode()
    for form in (wrapped, "data:image/jpeg;base64," + image):
        again = predict(gateway, "/rel_depth", form)
        np.testing.assert_allclose(decode_depth_map(again["depth_map"], again["shape"]), legacy, rtol=1e-5, atol=1e-6)


def test_concurrent_callers_each_get_their_own_answer(gateway, client, frame, tmp_path):
    # One AsyncClient carries every request: replies must reach the caller that asked, whatever the order.
    other = small_image(tmp_path / "other.jpg", "demo01.jpg", (96, 64))
    expected = {path: client.legacy_relative_depth(path.read_bytes()).depth for path in (frame, other)}
    assert not np.allclose(expected[frame], expected[other])
    jobs = [frame, other] * 6
    answers: list = [None] * len(jobs)

    def call(index: int) -> None:
        answers[index] = predict(gateway, "/rel_depth", encode_image(jobs[index]))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for path, answer in zip(jobs, answers):
        assert answer is not None
        np.testing.assert_allclose(decode_depth_map(answer["depth_map"], answer["shape"]), expected[path], rtol=1e-5, atol=1e-6)


def test_health_needs_no_key_and_has_the_old_fields(gateway):
    response = requests.get(f"{gateway}/health", timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "healthy" and body["device"] == "cpu" and body["gpu_id"] is None and body["gpu_count"] == 0
    assert body["models_loaded"] == ["vits", "vits-hypersim"] and body["total_model_instances"] == 2 and body["workers"] == 1
    before = body["request_counter"]
    post(gateway, "/rel_depth", {"image": "%%%"})
    assert requests.get(f"{gateway}/health", timeout=30).json()["request_counter"] == before + 1
    assert requests.get(f"{gateway}/docs", timeout=30).status_code == 200  # the old server's interactive docs
    schema = requests.get(f"{gateway}/openapi.json", timeout=30).json()
    assert {"/pc", "/metric_depth", "/rel_depth", "/health"} <= set(schema["paths"])


# ----------------------------------------------------------------------------- the key


def test_a_wrong_or_missing_bearer_key_is_401(gateway, frame):
    payload = {"image": encode_image(frame), "encoder": "vits", "model_input_size": SIZE}
    for path in ("/pc", "/metric_depth", "/rel_depth"):
        for api_key in (None, "wrong-key", KEY + "x", KEY[:-1]):
            response = post(gateway, path, payload, api_key=api_key)
            assert response.status_code == 401, (path, api_key, response.text)
            assert response.json()["code"] == "unauthorized" and response.headers["WWW-Authenticate"] == "Bearer"
    basic = requests.post(f"{gateway}/rel_depth", json=payload, headers={"Authorization": f"Basic {KEY}"}, timeout=30)
    assert basic.status_code == 401
    assert post(gateway, "/rel_depth", payload).status_code == 200


def raw_post(base_url: str, path: str, length: int, authorization: str | None) -> tuple[int, dict]:
    """Send only the headers of a POST declaring ``length`` body bytes, and read the answer."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        if authorization:
            conn.putheader("Authorization", authorization)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_the_key_and_the_body_limit_are_checked_before_the_body_is_read(gateway):
    # No body is ever sent: an answer proves the gateway did not wait for one.
    status, body = raw_post(gateway, "/pc", 50_000_000, None)
    assert status == 401 and body["code"] == "unauthorized"
    status, body = raw_post(gateway, "/metric_depth", MAX_BODY_BYTES + 1, f"Bearer {KEY}")
    assert status == 413 and "larger than" in body["detail"]


def test_the_key_comparison_takes_the_same_time_wherever_a_wrong_key_differs():
    key = "k" * 1_000_000
    digest = key_digest(key)
    assert key_matches(f"Bearer {key}".encode(), digest) and key_matches(f"bearer  {key}".encode(), digest)
    assert not key_matches(f"Bearer x{key[1:]}".encode(), digest) and not key_matches(None, digest)
    assert not key_matches(f"Basic {key}".encode(), digest) and not key_matches(b"Bearer", digest)
    # A long key makes a naive comparison's early exit measurable: with `==`, a token wrong in its
    # first byte is rejected about 100x sooner than one wrong in its last byte.
    early, late = b"x" + key.encode()[1:], key.encode()[:-1] + b"x"
    timings = {"early": [], "late": []}
    for _ in range(30):
        for name, token in (("early", early), ("late", late)):
            start = time.perf_counter()
            assert not token_matches(token, digest)
            timings[name].append(time.perf_counter() - start)
    ratio = statistics.median(timings["late"]) / statistics.median(timings["early"])
    assert 0.5 < ratio < 2.0, f"late/early mismatch time ratio {ratio:.2f}"


# ----------------------------------------------------------------------------- errors


def test_errors_map_to_http_statuses(gateway, frame):
    image = encode_image(frame)
    base = {"encoder": "vits", "dataset": "hypersim", "model_input_size": SIZE}

    def check(path, payload, status, code=None):
        response = post(gateway, path, payload)
        assert response.status_code == status, (payload.keys(), response.text)
        body = response.json()
        assert "detail" in body
        if code:
            assert body["code"] == code, body
        return body

    check("/rel_depth", {**base, "image": "not base64 at all!"}, 400, "bad_request")
    check("/rel_depth", {**base, "image": base64.b64encode(b"these bytes are no image").decode()}, 400, "bad_request")
    body = check("/metric_depth", {**base, "image": image, "model_input_size": 30}, 400, "bad_request")
    assert "14" in body["detail"]
    assert "camera_intrinsics" in check("/pc", {**base, "image": image}, 400, "bad_request")["detail"]
    check("/pc", {**base, "image": image, "camera_intrinsics": {**INTRINSICS, "fx": 0.0}}, 400, "bad_request")
    check("/rel_depth", {**base, "image": "ftp://example.com/a.jpg"}, 400, "bad_request")
    check("/rel_depth", base, 422)  # no image: the request does not parse, as with the old server's pydantic model
    check("/pc", {**base, "image": image, "camera_intrinsics": {"fx": 1.0}}, 422)
    # The old server's default encoder is vitl; this broker serves vits only.
    body = check("/rel_depth", {"image": image, "model_input_size": SIZE}, 404, "unknown_model")
    assert "vits-hypersim" in body["served"]


def test_every_zdepth_error_has_its_status():
    expected = {"unauthorized": 401, "bad_request": 400, "unknown_model": 404, "overloaded": 503, "worker_lost": 503, "timeout": 504, "internal": 500}
    assert {code: http_status(error_from_code(code, "x")) for code in expected} == expected
    assert http_status(BrokerUnreachable("cannot reach the broker")) == 503
    assert http_status(RuntimeError("a bug")) == 500


def test_no_broker_is_503_and_a_slow_answer_is_504(server, tmp_path):
    # Without a connection for min(timeout, 5) s the client reports the broker unreachable: 503, not 504.
    dead, dead_url = start_gateway(tmp_path, f"tcp://127.0.0.1:{free_port()}", "--timeout", "6", "--retries", "0", name="dead")
    slow, slow_url = start_gateway(tmp_path, server.client_address, "--timeout", "0.2", "--retries", "0", name="slow")
    try:
        image = base64.b64encode((Path(__file__).parent / "data" / "demo04.jpg").read_bytes()).decode()
        payload = {"image": image, "encoder": "vits", "model_input_size": SIZE}
        response = post(dead_url, "/rel_depth", payload)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1", response.text
        health = requests.get(f"{dead_url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        # A full-size photo at input 518 takes a CPU worker far longer than 0.2 s.
        response = post(slow_url, "/metric_depth", {**payload, "model_input_size": 518})
        assert response.status_code == 504 and response.json()["code"] == "timeout", response.text
        # SIGTERM: uvicorn finishes what it holds, closes the AsyncClient, then ends by the signal it got.
        assert slow.stop() in (0, -signal.SIGTERM) and "Application shutdown complete" in slow.output(), slow.tail()
    finally:
        dead.stop()
        slow.stop()


def test_startup_errors_exit_with_the_clis_statuses(tmp_path):
    env = child_env(None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "zdepth.gateway", "--host", "127.0.0.1", "--port", str(port)], env=env, capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 4 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "zdepth.gateway", "--allow-url-network", "10.0.0.0/8"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--allow-url-fetch" in proc.stderr, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "zdepth.gateway", "--allow-url-fetch", "--allow-url-network", "10.0.0.300/8"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--allow-url-network" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- images by URL


class ImageHandler(http.server.BaseHTTPRequestHandler):
    photo = b""
    hits: dict[str, int] = {}

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        ImageHandler.hits[path] = ImageHandler.hits.get(path, 0) + 1
        port = self.server.server_address[1]
        if path == "/photo.jpg":
            self._send(200, self.photo, "image/jpeg")
        elif path == "/redirect":
            self._redirect("/photo.jpg")
        elif path == "/to-other-loopback":  # 127.0.0.2 is loopback too, outside the allowed 127.0.0.1/32
            self._redirect(f"http://127.0.0.2:{port}/photo.jpg")
        elif path == "/loop":
            self._redirect("/loop")
        elif path == "/big":
            self._send(200, b"\xff" * (URL_LIMIT + 1), "image/jpeg")
        elif path == "/page":
            self._send(200, b"<html>no image</html>", "text/html")
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(self.photo)))
            self.end_headers()
            self.wfile.write(self.photo[:100])
            self.wfile.flush()
            time.sleep(6)
        else:
            self._send(404, b"", "text/plain")

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass


@pytest.fixture(scope="module")
def image_host(frame):
    ImageHandler.photo = frame.read_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def url_gateway(server, tmp_path_factory):
    proc, base_url = start_gateway(
        tmp_path_factory.mktemp("url-gateway"), server.client_address,
        "--allow-url-fetch", "--allow-url-network", "127.0.0.1/32", "--url-max-bytes", str(URL_LIMIT), "--url-timeout", "2",
        name="url-gateway",
    )  # fmt: skip
    yield base_url
    proc.stop()


def test_urls_are_refused_unless_the_gateway_fetches(gateway, image_host):
    ImageHandler.hits.clear()
    response = post(gateway, "/rel_depth", {"image": f"{image_host}/photo.jpg?token=secret", "encoder": "vits", "model_input_size": SIZE})
    assert response.status_code == 400 and "--allow-url-fetch" in response.json()["detail"]
    assert "secret" not in response.text, "a URL's query (signed URLs carry tokens there) is never echoed"
    response = post(gateway, "/rel_depth", {"image_url": f"{image_host}/photo.jpg", "encoder": "vits", "model_input_size": SIZE})
    assert response.status_code == 400 and "--allow-url-fetch" in response.json()["detail"]
    assert ImageHandler.hits == {}, "the gateway must not touch a URL it does not fetch"


def test_a_fetching_gateway_gives_the_same_numbers_by_url(url_gateway, client, frame, image_host):
    ImageHandler.hits.clear()
    legacy = client.legacy_relative_depth(frame.read_bytes()).depth
    for fields in ({"image": f"{image_host}/photo.jpg"}, {"image_url": f"{image_host}/redirect"}):
        payload = {"encoder": "vits", "dataset": "hypersim", "model_input_size": SIZE, **fields}
        response = post(url_gateway, "/rel_depth", payload)
        assert response.status_code == 200, response.text
        rel = response.json()
        np.testing.assert_allclose(decode_depth_map(rel["depth_map"], rel["shape"]), legacy, rtol=1e-5, atol=1e-6)
    assert ImageHandler.hits == {"/photo.jpg": 2, "/redirect": 1}


def test_a_fetching_gateway_refuses_private_hops_big_or_slow_downloads(url_gateway, image_host):
    def refused(url: str) -> str:
        response = post(url_gateway, "/rel_depth", {"image": url, "encoder": "vits", "model_input_size": SIZE})
        assert response.status_code == 400, response.text
        return response.json()["detail"]

    assert "127.0.0.2" in refused(f"{image_host}/to-other-loopback") and "private" in refused(f"{image_host}/to-other-loopback")
    assert "redirects" in refused(f"{image_host}/loop")
    assert f"larger than {URL_LIMIT}" in refused(f"{image_host}/big")
    assert "text/html" in refused(f"{image_host}/page")
    assert "HTTP 404" in refused(f"{image_host}/missing.jpg")
    started = time.monotonic()
    assert "no complete answer in 2 s" in refused(f"{image_host}/slow")
    assert time.monotonic() - started < 5


def test_fetch_url_checks_the_address_of_every_host(image_host):
    # In process: the same function the gateway runs, with the default policy (public addresses only).
    ImageHandler.hits.clear()
    port = image_host.rsplit(":", 1)[1]
    policy = UrlPolicy(fetch=True)
    for url in (f"{image_host}/photo.jpg", f"http://localhost:{port}/photo.jpg", f"http://[::ffff:127.0.0.1]:{port}/photo.jpg"):
        with pytest.raises(BadRequest, match="private, loopback or link-local"):
            fetch_url(url, policy)
    assert ImageHandler.hits == {}
    with pytest.raises(BadRequest, match="--allow-url-fetch"):
        fetch_url(f"{image_host}/photo.jpg", UrlPolicy())
    allowed = UrlPolicy(fetch=True, networks=UrlPolicy.parse_networks(["127.0.0.0/8"]))
    assert fetch_url(f"http://localhost:{port}/photo.jpg", allowed) == ImageHandler.photo  # ::1 is skipped, 127.0.0.1 used


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("2002:0a00:0001::", False),  # 6to4 carrying 10.0.0.1
    ],
)
def test_which_addresses_are_public(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_the_benchmark_runs(tmp_path):
    """benchmarks/gateway.py in its tiny --quick mode, so it keeps working (no number is judged)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gateway.json"
    env = child_env(None)
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gateway.py"), "--quick", "--json", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "gateway" and all(result["modes"][m]["n"] > 0 for m in ("direct-metric", "gateway-metric", "direct-pc", "gateway-pc"))
