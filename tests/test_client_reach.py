"""Finding the broker: address forms and profile names, a broker that is down, gone or restarting.

Servers are ROUTERs on real loopback ports (the fake of test_client.py, or a
bare one here bound to a port chosen in advance so it can come back on it).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import zmq

from procs import free_port
from test_client import Received, answer, fake_depth, frame, serve  # noqa: F401  (serve is a fixture)
from zdepth import AsyncClient, Client, protocol
from zdepth.errors import BrokerUnreachable, ConfigError, DeadlineExceeded
from zdepth.protocol import codec

pytestmark = pytest.mark.timeout(60)

SLACK = 0.6  # a busy 2-core machine; what is checked is that the bound, not the whole timeout, applies


class PortServer:
    """A ROUTER bound to ``port`` that answers requests (``answering``) or sits on them, until closed."""

    def __init__(self, port: int, *, answering: bool) -> None:
        self.received: list[dict] = []
        self.answering = answering
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(f"tcp://127.0.0.1:{port}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(20):
                continue
            identity, *frames = self._socket.recv_multipart()
            header = protocol.unpack_map(frames[0], what="header")
            self.received.append(header)
            if self.answering:
                params = codec.parse_params(header["op"], frames[1]) if header["op"] in protocol.MODEL_OPS else None
                image = codec.decode_image_frame(params.image, frames[2]) if params else None
                self._socket.send_multipart([identity, *answer(Received(identity, header, params, image, frames))])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close(linger=0)
        self._context.term()


def closed_port() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


# ----------------------------------------------------------------------------- a broker that is not there


def test_no_broker_is_reported_within_five_seconds_not_a_minute():
    address = closed_port()
    start = time.monotonic()
    with Client(address) as client:  # the defaults: 30 s per attempt, one retry
        with pytest.raises(BrokerUnreachable) as info:
            client.health()
    elapsed = time.monotonic() - start
    assert 4.9 <= elapsed <= 5.0 + SLACK
    message = str(info.value)
    assert message.startswith(f"cannot reach the broker at {address}: no connection in 5.0 s")
    assert f"zdepth health --server {address}" in message
    assert isinstance(info.value, DeadlineExceeded) and isinstance(info.value, ConnectionError)
    assert info.value.details["address"] == address


def test_a_short_timeout_bounds_the_wait_for_a_connection_too():
    address = closed_port()

    async def main():
        async with AsyncClient(address, timeout=0.8, retries=3) as client:
            with pytest.raises(BrokerUnreachable, match=f"cannot reach the broker at {address}"):
                await asyncio.gather(client.relative_depth(frame()), client.health())

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start <= 0.8 + SLACK


def test_a_broker_that_starts_late_is_still_reached():
    port = free_port()
    server: list[PortServer] = []
    timer = threading.Timer(0.5, lambda: server.append(PortServer(port, answering=True)))
    timer.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=5, retries=0) as client:
            result = client.relative_depth(frame(1))
        np.testing.assert_array_equal(result.depth, fake_depth(frame(1)))
        assert len(server[0].received) == 1  # sent once, when the connection came up
    finally:
        timer.join()
        for s in server:
            s.close()


# ----------------------------------------------------------------------------- a broker that goes away


def _close_when_received(server: PortServer) -> threading.Thread:
    def run() -> None:
        while not server.received:
            time.sleep(0.01)
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_restarted_broker_gets_the_request_again_at_once():
    # The first broker takes the request and dies; a new one comes up on the same port. The request is
    # resent as soon as the connection is back (spending the retry), not after its 10 s timeout.
    port = free_port()
    first = PortServer(port, answering=False)
    closer = _close_when_received(first)
    second: list[PortServer] = []

    def restart() -> None:
        closer.join()
        time.sleep(0.3)
        second.append(PortServer(port, answering=True))

    restarter = threading.Thread(target=restart, daemon=True)
    restarter.start()
    try:
        start = time.monotonic()
        with Client(f"tcp://127.0.0.1:{port}", timeout=10, retries=1) as client:
            result = client.relative_depth(frame(2))
        assert time.monotonic() - start < 4.0
        np.testing.assert_array_equal(result.depth, fake_depth(frame(2)))
        assert len(first.received) == 1 and len(second[0].received) == 1
        assert first.received[0]["id"] != second[0].received[0]["id"]
    finally:
        restarter.join(10)
        for s in second:
            s.close()


def test_a_dropped_connection_with_no_retry_left_fails_at_once():
    port = free_port()
    server = PortServer(port, answering=False)
    _close_when_received(server)
    start = time.monotonic()
    with Client(f"tcp://127.0.0.1:{port}", timeout=10, retries=0) as client:
        with pytest.raises(DeadlineExceeded, match="dropped while this request was out") as info:
            client.relative_depth(frame())
    assert time.monotonic() - start < 3.0
    assert info.value.details["reason"] == "connection_lost"


def test_a_broker_that_stays_gone_is_reported_within_the_bound():
    port = free_port()
    server = PortServer(port, answering=False)
    _close_when_received(server)
    start = time.monotonic()
    with Client(f"tcp://127.0.0.1:{port}", timeout=1.5, retries=3) as client:  # it would take 6 s to time out
        with pytest.raises(BrokerUnreachable, match="the connection dropped and was not re-established"):
            client.relative_depth(frame())
    assert time.monotonic() - start <= 1.5 + 0.5 + SLACK


# ----------------------------------------------------------------------------- address forms and profiles


def test_host_port_is_an_address(serve):
    server = serve()
    host_port = server.address.removeprefix("tcp://")
    with Client(host_port) as client:
        assert client.address == server.address
        assert client.health()["status"] == "ok"

    async def main():
        async with AsyncClient(host_port) as client:
            return await client.health()

    assert asyncio.run(main())["status"] == "ok"


@pytest.fixture
def lab_profile(serve, tmp_path, monkeypatch):
    """A profiles file with ``lab`` pointing at a fake server (key from a file, a model, a timeout)."""
    server = serve()
    (tmp_path / "lab.key").write_text("lab-secret\n")
    profiles = tmp_path / "profiles.toml"
    host_port = server.address.removeprefix("tcp://")
    profiles.write_text(f'[lab]\naddress = "{host_port}"\nkey_file = "lab.key"\nmodel = "vitl-vkitti"\ntimeout = 7.5\n')
    monkeypatch.setenv("ZDEPTH_CONFIG", str(profiles))
    monkeypatch.delenv("ZDEPTH_KEY", raising=False)
    return server


def test_a_profile_name_is_a_server(lab_profile):
    server = lab_profile
    with Client("lab") as client:
        assert (client.address, client.profile, client.timeout) == (server.address, "lab", 7.5)
        client.metric_depth(frame())
    header = server.requests[-1].header
    assert (header["key"], header["model"]) == ("lab-secret", "vitl-vkitti")

    async def main():
        async with AsyncClient("lab") as client:
            await client.relative_depth(frame())

    asyncio.run(main())
    assert server.requests[-1].header["model"] == "vitl"


def test_arguments_win_over_the_profile(lab_profile):
    server = lab_profile
    # Even an argument equal to the default is the caller's choice.
    with Client("lab", key="mine", timeout=30.0, encoder="vits", dataset="hypersim") as client:
        assert client.timeout == 30.0
        client.metric_depth(frame())
    header = server.requests[-1].header
    assert (header["key"], header["model"]) == ("mine", "vits-hypersim")
    with Client("lab", dataset="hypersim") as client:  # the profile's encoder, the caller's dataset
        client.metric_depth(frame())
    assert server.requests[-1].header["model"] == "vitl-hypersim"


def test_an_unknown_name_says_what_it_could_be(lab_profile):
    with pytest.raises(ConfigError) as info:
        Client("gpu-box")
    message = str(info.value)
    assert "no profile 'gpu-box'" in message and "lab" in message and "tcp://gpu-box:5555" in message
