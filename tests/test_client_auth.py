"""The client at the ZeroMQ handshake: the key over PLAIN, CurveZMQ, and what a refusal or a mismatch says.

The servers are ROUTERs on real loopback ports, secured as the broker secures
its own (zdepth.protocol.auth), answering per protocol; one test runs a real broker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest
import zmq

from procs import child_env, free_port, spawn, wait_for_health, zdepth_argv
from test_client import answer, frame
from zdepth import AsyncClient, Client, protocol
from zdepth.errors import Unauthorized
from zdepth.protocol import auth
from zdepth.protocol.curve import CurveClient, CurveServer, generate

pytestmark = pytest.mark.timeout(60)

PROMPT_S = 3.0  # a refusal is reported well before the 10 s these clients would wait for a reply


class SecureServer:
    """A ROUTER secured like the broker (PLAIN with ``key``, or CurveZMQ), answering every request at once.

    ``user_ids`` records, per request, the identity the handshake proved
    (``zdepth`` for PLAIN, the client's public key for CurveZMQ, empty for none).
    """

    def __init__(self, *, key: str | None = None, curve: CurveServer | None = None) -> None:
        self.requests: list[dict] = []
        self.user_ids: list[str] = []
        self._context = zmq.Context()
        self._auth = auth.start_broker_auth(self._context, key=key, curve=curve)
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        auth.apply_broker_security(self._socket, key=key, curve=curve)
        self.address = f"tcp://127.0.0.1:{self._socket.bind_to_random_port('tcp://127.0.0.1')}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from test_client import Received
        from zdepth.protocol import codec

        while not self._stop.is_set():
            if not self._socket.poll(20):
                continue
            identity, *frames = self._socket.recv_multipart(copy=False)
            header = protocol.unpack_map(frames[0].bytes, what="header")
            self.requests.append(header)
            try:
                self.user_ids.append(frames[0].get("User-Id"))
            except zmq.ZMQError:  # no security mechanism, no user id
                self.user_ids.append("")
            params = image = None
            if header["op"] in protocol.MODEL_OPS:
                params = codec.parse_params(header["op"], frames[1].bytes)
                image = codec.decode_image_frame(params.image, frames[2].bytes)
            rec = Received(identity.bytes, header, params, image, [f.bytes for f in frames])
            self._socket.send_multipart([identity.bytes, *answer(rec)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._context.term()


@pytest.fixture
def secure():
    servers: list[SecureServer] = []

    def start(**kwargs) -> SecureServer:
        servers.append(SecureServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def certificates(tmp_path: Path):
    broker_public, broker_secret = generate(tmp_path / "broker", "broker")
    robot_public, robot_secret = generate(tmp_path / "robot", "robot")
    allow = tmp_path / "allowed"
    allow.mkdir()
    return {
        "server": CurveServer(broker_secret, allow),
        "client": CurveClient(robot_secret, broker_public),
        "robot_public": robot_public,
        "allow": allow,
    }


def test_the_key_is_proven_at_the_handshake(secure):
    server = secure(key="s3cret")
    with Client(server.address, key="s3cret", timeout=10) as client:
        assert client.health()["status"] == "ok"
        client.relative_depth(frame())
    assert server.user_ids == [auth.PLAIN_USERNAME, auth.PLAIN_USERNAME]  # PLAIN, not a header alone
    assert [h["key"] for h in server.requests] == ["s3cret", "s3cret"]  # and still in every header


@pytest.mark.parametrize("driver", ["blocking", "asyncio"])
def test_a_refused_key_fails_promptly_with_what_to_check(secure, driver):
    server = secure(key="s3cret")
    start = time.monotonic()
    if driver == "blocking":
        with Client(server.address, key="wrong", timeout=10) as client:
            with pytest.raises(Unauthorized) as info:
                client.health()
            with pytest.raises(Unauthorized):  # a new call tries a fresh connection, and is refused again
                client.relative_depth(frame())
    else:

        async def main():
            async with AsyncClient(server.address, key="wrong", timeout=10) as client:
                with pytest.raises(Unauthorized) as info:
                    await asyncio.gather(client.health(), client.relative_depth(frame()))
                with pytest.raises(Unauthorized):
                    await client.health()
                return info

        info = asyncio.run(main())
    assert time.monotonic() - start < PROMPT_S
    message = str(info.value)
    assert f"the broker at {server.address} refused the key" in message and "ZDEPTH_KEY" in message and "key_file" in message
    assert "wrong" not in message  # the key itself is never shown
    assert server.requests == []  # nothing got in


@pytest.mark.parametrize("driver", ["blocking", "asyncio"])
def test_a_keyless_broker_gets_the_key_in_headers_only(secure, driver, caplog):
    server = secure()  # no key: it answers PLAIN with a mechanism mismatch
    caplog.set_level(logging.INFO, logger="zdepth")
    if driver == "blocking":
        with Client(server.address, key="s3cret", timeout=10) as client:
            client.health()
            client.relative_depth(frame())
    else:

        async def main():
            async with AsyncClient(server.address, key="s3cret", timeout=10) as client:
                await asyncio.gather(client.health(), client.relative_depth(frame()))

        asyncio.run(main())
    assert [h["key"] for h in server.requests] == ["s3cret", "s3cret"]
    assert server.user_ids == ["", ""]
    said = [r.getMessage() for r in caplog.records if "does not ask for the key" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"the broker at {server.address}")
    assert all(r.levelno == logging.INFO for r in caplog.records if "does not ask for the key" in r.getMessage())


def test_no_key_for_a_broker_that_wants_one(secure, monkeypatch):
    monkeypatch.delenv("ZDEPTH_KEY", raising=False)
    monkeypatch.delenv("ZDEPTH_KEY_FILE", raising=False)
    server = secure(key="s3cret")
    start = time.monotonic()
    with Client(server.address, timeout=10) as client:
        with pytest.raises(Unauthorized, match="asks for a key or CurveZMQ at the handshake, and this client has neither") as info:
            client.health()
    assert time.monotonic() - start < PROMPT_S
    assert "ZDEPTH_KEY" in str(info.value) and "curve=CurveClient" in str(info.value)


def test_a_key_but_no_curve_for_a_curve_broker(secure, certificates):
    server = secure(curve=certificates["server"])
    start = time.monotonic()
    with Client(server.address, key="s3cret", timeout=10) as client:
        with pytest.raises(Unauthorized) as info:
            client.health()
    assert time.monotonic() - start < PROMPT_S
    message = str(info.value)
    assert f"the broker at {server.address} uses CurveZMQ and this client does not" in message
    assert "curve=CurveClient(" in message and "curve_secret" in message and "curve_server_key" in message


@pytest.mark.parametrize("broker_key", [None, "s3cret"], ids=["keyless", "keyed"])
def test_curve_on_the_client_only(secure, certificates, broker_key):
    server = secure(key=broker_key)
    with Client(server.address, key="s3cret", curve=certificates["client"], timeout=10) as client:
        with pytest.raises(Unauthorized) as info:
            client.health()
    message = str(info.value)
    assert f"this client uses CurveZMQ but the broker at {server.address} does not" in message
    assert "--curve-secret" in message and "curve=" in message


def test_curve_certificate_not_in_the_allow_list(secure, certificates):
    server = secure(curve=certificates["server"])
    start = time.monotonic()
    with Client(server.address, curve=certificates["client"], timeout=10) as client:
        for _ in range(2):  # and again on a fresh connection for the next call
            with pytest.raises(Unauthorized, match="refused this client's CurveZMQ certificate") as info:
                client.health()
    assert time.monotonic() - start < PROMPT_S
    assert "--curve-allow" in str(info.value) and "robot.key_secret" in str(info.value)
    assert server.requests == []


def test_against_a_real_broker_with_a_key(tmp_path):
    port, worker_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    broker = spawn(
        zdepth_argv("broker", "--clients", address, "--workers", f"tcp://127.0.0.1:{worker_port}"),
        tmp_path / "broker.log",
        child_env(ZDEPTH_KEY="s3cret"),
    )
    try:
        wait_for_health(address, key="s3cret", workers=0, procs=[broker], timeout=30)
        with Client(address, key="s3cret", timeout=10) as client:
            assert "workers" in client.health()
        start = time.monotonic()
        with Client(address, key="wrong", timeout=10) as client:
            with pytest.raises(Unauthorized, match="refused the key"):
                client.health()
        assert time.monotonic() - start < PROMPT_S
    finally:
        broker.stop()


def test_clients_come_and_go_without_leaking_monitors(secure):
    # Each socket's monitor has an inproc address derived from the socket's descriptor, which the next socket
    # reuses: closing in the wrong order makes a later client fail to open.
    server = secure(key="s3cret")

    async def one_async() -> None:
        async with AsyncClient(server.address, key="s3cret", timeout=10) as client:
            await client.health()

    for i in range(40):
        if i % 2:
            with Client(server.address, key="s3cret", timeout=10) as client:
                client.health()
        else:
            asyncio.run(one_async())
    assert len(server.requests) == 40
