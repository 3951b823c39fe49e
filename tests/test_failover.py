"""Clients given several brokers, against real broker processes: failover when one dies, freezes or is down.

Two brokers run as their own processes (tests/peers.py); each "worker" here is
one thread speaking the worker protocol to both brokers at once (a connection
and a READY per broker, READY again when a restarted broker does not know it),
answering each request with a depth map that encodes the frame it was sent,
so every result can be checked against its own frame. Clients are the real
``zdepth.Client`` and ``zdepth.AsyncClient`` over loopback TCP. ``kill -9``
is ``SIGKILL`` to the broker process: its connections close at once.

Run with ``-s`` to see the failover times (last reply through the broker that
died to the first through the other).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from peers import KEY, BrokerProcess, dealer, start_broker, wait_until
from procs import free_port
from zdepth import AsyncClient, Client, protocol
from zdepth.client.results import DepthResult
from zdepth.errors import BrokerUnreachable, ConfigError, DeadlineExceeded, ServiceError
from zdepth.protocol import codec

pytestmark = pytest.mark.timeout(120)

TIMEOUT, RETRIES = 3.0, 1
BOUND = TIMEOUT * (RETRIES + 1)
SLACK = 0.5  # scheduling on a loaded 2-core machine; the bound itself is what is checked


# ----------------------------------------------------------------------------- peers


def numbered(index: int) -> np.ndarray:
    """A tiny BGR frame that carries its index in two pixels of its first channel."""
    image = np.zeros((4, 6, 3), np.uint8)
    image[0, 0, 0], image[0, 1, 0] = index % 256, index // 256
    return image


def index_of(result: DepthResult) -> int:
    """The index of the frame a reply was computed from (the worker echoes the first channel as depth)."""
    return int(result.depth[0, 0]) + 256 * int(result.depth[0, 1])


class BothBrokersWorker(threading.Thread):
    """One worker connected to every broker given, on one thread, as a multi-broker worker process is.

    Each request is answered ``compute_s`` after it arrived, through the
    broker it came from, with the image's first channel as its depth map. A
    broker that says ``unknown_worker`` (it restarted) gets READY again.
    ``served[i]``: requests answered through broker ``i``.
    """

    def __init__(self, ctx: zmq.Context, endpoints: list[str], *, name: str, compute_s: float = 0.01, capacity: int = 4) -> None:
        super().__init__(daemon=True, name=name)
        self.ctx, self.endpoints, self.compute_s, self.capacity = ctx, endpoints, compute_s, capacity
        self.received = [0] * len(endpoints)
        self.served = [0] * len(endpoints)
        self.registrations = [0] * len(endpoints)
        self._halt = threading.Event()
        self.start()

    def _ready(self, sock: zmq.Socket, index: int) -> None:
        sock.send_multipart([protocol.command("ready", key=KEY, models=["vits"], capacity=self.capacity, info={"name": self.name})])
        self.registrations[index] += 1

    def run(self) -> None:
        socks = [dealer(self.ctx, endpoint) for endpoint in self.endpoints]
        poller = zmq.Poller()
        for index, sock in enumerate(socks):
            poller.register(sock, zmq.POLLIN)
            self._ready(sock, index)
        held: list[tuple[float, int, dict[str, Any], bytes, bytes]] = []
        next_beat = 0.0
        try:
            while not self._halt.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    for sock in socks:
                        sock.send_multipart([protocol.command("heartbeat")])
                    next_beat = now + 0.2
                for index, sock in enumerate(socks):
                    while sock.poll(0):
                        frames = sock.recv_multipart()
                        header = msgpack.unpackb(frames[0], raw=False)
                        if header.get("cmd") == "request":
                            self.received[index] += 1
                            held.append((now + self.compute_s, index, header, frames[1], frames[2]))
                        elif header.get("cmd") == "disconnect" and header.get("reason") == "unknown_worker":
                            held = [job for job in held if job[1] != index]  # the broker forgot us and what we held
                            self._ready(sock, index)
                now = time.monotonic()
                for job in [job for job in held if job[0] <= now]:
                    held.remove(job)
                    _, index, header, params, image = job
                    pixels = codec.decode_image_frame(codec.parse_params(header["op"], params).image, image)
                    depth = np.ascontiguousarray(pixels[..., 0], dtype=np.float32)
                    descs, buffers = codec.array_frames({"depth": depth})
                    reply = protocol.reply_header(
                        header["id"], arrays=descs, model=header["model"], worker=self.name,
                        min=float(depth.min()), max=float(depth.max()), timings={},
                    )  # fmt: skip
                    socks[index].send_multipart([protocol.command("reply", rid=header["rid"], status="ok"), reply, *buffers])
                    self.served[index] += 1
                poller.poll(5)
        finally:
            for sock in socks:
                sock.close(linger=0)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class Workers:
    """Starts BothBrokersWorkers on one ZeroMQ context; stops them all, then the context, after the test."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.started: list[BothBrokersWorker] = []

    def __call__(self, endpoints: list[str], count: int = 2, **options: Any) -> list[BothBrokersWorker]:
        workers = [BothBrokersWorker(self.ctx, endpoints, name=f"worker-{len(self.started) + n}", **options) for n in range(count)]
        self.started.extend(workers)
        return workers

    def close(self) -> None:
        for worker in self.started:
            worker.stop()
        self.ctx.destroy(linger=0)


@pytest.fixture
def workers_on():
    workers = Workers()
    yield workers
    workers.close()


@pytest.fixture
def brokers(tmp_path):
    """start(**fields) -> a broker process; every one is stopped (and continued, if stopped) after the test."""
    started: list[BrokerProcess] = []

    def start(**fields: Any) -> BrokerProcess:
        started.append(start_broker(tmp_path, **fields))
        return started[-1]

    yield start
    for broker in started:
        if broker.popen.poll() is None:
            broker.popen.send_signal(signal.SIGCONT)
        broker.stop(signal.SIGKILL)


def wait_for_workers(broker: BrokerProcess, count: int) -> None:
    with Client(broker.clients, key=KEY, timeout=2, retries=0) as client:
        client.wait_ready(timeout=20, workers=count)


def restart(start, broker: BrokerProcess) -> BrokerProcess:
    """The same broker again, on the same ports (as a supervisor restarts it)."""
    return start(clients=broker.clients, workers=broker.workers)


def connected(client: Client | AsyncClient, index: int) -> bool:
    """Whether the client's connection to its ``index``-th broker is up (as its own driver last saw it)."""
    return client._pipeline.links[index].up


# ----------------------------------------------------------------------------- streaming clients


class Streamer(threading.Thread):
    """A client streaming numbered frames from its own thread until told to stop: what each frame got, and when.

    ``kind`` is ``"sync"`` (Client.stream) or ``"async"`` (AsyncClient.stream in
    its own event loop). Frames go out every ``pace`` seconds while there is
    room; ``submitted[i]`` is when frame i was handed over, ``items`` holds
    (when yielded, result or error) in order.
    """

    def __init__(self, kind: str, addresses: list[str], *, pace: float = 0.01) -> None:
        super().__init__(daemon=True, name=f"stream-{kind}")
        self.kind, self.addresses, self.pace = kind, addresses, pace
        self.submitted: dict[int, float] = {}
        self.items: list[tuple[float, Any]] = []
        self.client: Client | AsyncClient | None = None
        self.ready = threading.Event()
        self.halt = threading.Event()
        self.failure: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            if self.kind == "sync":
                self._sync()
            else:
                asyncio.run(self._async())
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def _sync(self) -> None:
        def frames():
            index = 0
            while not self.halt.is_set():
                self.submitted[index] = time.monotonic()
                yield numbered(index)
                index += 1
                time.sleep(self.pace)

        with Client(self.addresses, key=KEY, timeout=TIMEOUT, retries=RETRIES) as client:
            self.client = client
            client.health_all()  # both connections up before the first frame: the first broker is chosen
            self.ready.set()
            for item in client.stream(frames(), max_in_flight=4, return_exceptions=True):
                self.items.append((time.monotonic(), item))

    async def _async(self) -> None:
        async def frames():
            index = 0
            while not self.halt.is_set():
                self.submitted[index] = time.monotonic()
                yield numbered(index)
                index += 1
                await asyncio.sleep(self.pace)

        async with AsyncClient(self.addresses, key=KEY, timeout=TIMEOUT, retries=RETRIES) as client:
            self.client = client
            await client.health_all()
            self.ready.set()
            async for item in client.stream(frames(), max_in_flight=4, return_exceptions=True):
                self.items.append((time.monotonic(), item))

    def via(self, address: str, since: float = 0.0) -> int:
        return sum(1 for at, item in list(self.items) if at >= since and isinstance(item, DepthResult) and item.broker == address)

    def finish(self) -> None:
        self.halt.set()
        self.join(BOUND + 10)
        assert not self.is_alive(), f"{self.kind} stream did not end"
        if self.failure is not None:
            raise self.failure

    def failover_s(self, other: str, killed_at: float) -> float:
        """From the last result the stream gave before the broker in use was killed (through that broker) to
        the first it gave through ``other``."""
        last = max(at for at, _ in self.items if at < killed_at)
        first = min(at for at, item in self.items if isinstance(item, DepthResult) and item.broker == other and at >= killed_at)
        return first - last


def check_every_frame(streamer: Streamer) -> list[DepthResult]:
    """Each frame got exactly one item, in order, by its bound, and it is a result computed from that frame."""
    items = streamer.items
    errors = [item for _, item in items if not isinstance(item, DepthResult)]
    assert not errors, f"{streamer.kind}: {len(errors)} frame(s) failed: {errors[:3]!r}"
    results = [item for _, item in items]
    assert [item.index for item in results] == list(range(len(items))), f"{streamer.kind}: a frame was lost, repeated or reordered"
    for at, result in items:
        assert index_of(result) == result.index, f"{streamer.kind}: frame {result.index} got frame {index_of(result)}'s reply"
        waited = at - streamer.submitted[result.index]
        assert waited <= BOUND + SLACK, f"{streamer.kind}: frame {result.index} took {waited:.2f} s, over its bound of {BOUND:g} s"
    return results


def kill(broker: BrokerProcess) -> float:
    """kill -9; returns when the signal was sent (nothing it relays can arrive after that)."""
    killed_at = time.monotonic()
    broker.popen.kill()
    broker.popen.wait(10)
    return killed_at


# ----------------------------------------------------------------------------- the tests


def test_killing_the_broker_in_use_moves_streams_to_the_other_and_a_restarted_one_rejoins(workers_on, brokers):
    a, b = brokers(), brokers()
    workers = workers_on([a.workers, b.workers])
    wait_for_workers(a, 2)
    wait_for_workers(b, 2)
    streams = [Streamer("sync", [a.clients, b.clients]), Streamer("async", [a.clients, b.clients])]
    try:
        for stream in streams:
            assert stream.ready.wait(20), f"{stream.kind} client never reached both brokers: {stream.failure!r}"
        wait_until(lambda: all(s.via(a.clients) >= 30 for s in streams), timeout=30, what="results through the first broker")

        first_kill = kill(a)  # kill -9 the broker every client uses
        wait_until(lambda: all(s.via(b.clients, first_kill) >= 30 for s in streams), timeout=30, what="results through the second broker")

        a = restart(brokers, a)  # it rejoins: the workers announce themselves again, the clients reconnect
        wait_for_workers(a, 2)
        wait_until(lambda: all(s.client is not None and connected(s.client, 0) for s in streams), timeout=20, what="clients reconnected")
        # They stay on the broker that works: nothing sent since the kill went to the restarted one.
        assert not any(item.broker == a.clients for s in streams for _, item in list(s.items) if s.submitted[item.index] > first_kill)

        second_kill = kill(b)
        wait_until(lambda: all(s.via(a.clients, second_kill) >= 30 for s in streams), timeout=30, what="results through the restarted broker")
    finally:
        for stream in streams:
            stream.halt.set()
    for stream in streams:
        stream.finish()
        results = check_every_frame(stream)
        for result in results:
            submitted = stream.submitted[result.index]
            if submitted > second_kill:
                assert result.broker == a.clients, result
            elif submitted > first_kill:  # the one that works (or moved off it when it died with the request)
                assert result.broker == b.clients or submitted > second_kill - BOUND, result
            else:  # through the first (or moved off it when it died with the request)
                assert result.broker == a.clients or submitted > first_kill - BOUND, result
        assert sum(1 for r in results if stream.submitted[r.index] < first_kill and r.broker == a.clients) >= 30
        gaps = stream.failover_s(b.clients, first_kill), stream.failover_s(a.clients, second_kill)
        print(f"\n{stream.kind} stream: {len(results)} frames; failover {gaps[0] * 1000:.0f} ms, back to the restarted broker {gaps[1] * 1000:.0f} ms")
        # A dead connection moves what it held at once: far sooner than an attempt's timeout.
        assert max(gaps) < TIMEOUT, gaps
    assert all(worker.registrations[0] >= 2 for worker in workers)  # each announced itself to the restarted broker


def test_with_no_retry_a_request_out_on_the_broker_that_dies_fails_at_once_and_the_next_goes_on(workers_on, brokers):
    a, b = brokers(), brokers()
    (worker,) = workers_on([a.workers, b.workers], count=1, compute_s=10.0)  # holds what it gets
    wait_for_workers(a, 1)
    wait_for_workers(b, 1)
    outcome: dict[str, Any] = {}
    with Client([a.clients, b.clients], key=KEY, timeout=20, retries=0) as client:
        client.health_all()

        def call() -> None:
            try:
                outcome["result"] = client.relative_depth(numbered(7))
            except BaseException as exc:
                outcome["error"] = exc
            outcome["at"] = time.monotonic()

        caller = threading.Thread(target=call)
        caller.start()
        wait_until(lambda: worker.received[0] == 1, what="the request at the worker, through the first broker")
        killed = kill(a)
        caller.join(10)
        assert not caller.is_alive()
        error = outcome.get("error")
        assert isinstance(error, DeadlineExceeded) and error.details["reason"] == "connection_lost", outcome
        assert a.clients in str(error) and "no retry was left" in str(error)
        assert outcome["at"] - killed < 2.0  # at once, not after the 20 s timeout

        worker.compute_s = 0.01
        started = time.monotonic()
        result = client.relative_depth(numbered(8))
        assert index_of(result) == 8 and result.broker == b.clients
        assert time.monotonic() - started < 2.0
    assert worker.received == [1, 1]  # nothing was sent twice


def test_a_frozen_broker_is_left_when_a_request_to_it_times_out_unanswered(workers_on, brokers):
    a, b = brokers(), brokers()
    workers_on([a.workers, b.workers], count=1)
    wait_for_workers(a, 1)
    wait_for_workers(b, 1)
    with Client([a.clients, b.clients], key=KEY, timeout=1.0, retries=1) as client:
        assert client.relative_depth(numbered(1)).broker == a.clients
        a.popen.send_signal(signal.SIGSTOP)  # a host that stopped answering but never closed its connections
        started = time.monotonic()
        result = client.relative_depth(numbered(2))
        elapsed = time.monotonic() - started
        assert index_of(result) == 2 and result.broker == b.clients
        assert 1.0 - 0.05 <= elapsed <= 2.0 + SLACK, elapsed  # one attempt's timeout, then the retry elsewhere
        started = time.monotonic()
        assert client.relative_depth(numbered(3)).broker == b.clients  # the next goes straight to the live one
        assert time.monotonic() - started < 1.0


def test_async_calls_keep_their_bound_when_the_broker_dies_under_them(workers_on, brokers):
    a, b = brokers(), brokers()
    workers_on([a.workers, b.workers], count=2, compute_s=0.05)
    wait_for_workers(a, 2)
    wait_for_workers(b, 2)

    async def main() -> tuple[list[Any], list[float], float]:
        async with AsyncClient(f"{a.clients},{b.clients}", key=KEY, timeout=TIMEOUT, retries=RETRIES) as client:
            await client.health_all()

            async def timed(index: int) -> tuple[Any, float]:
                await asyncio.sleep(0.03 * index)
                started = time.monotonic()
                try:
                    result: Any = await client.relative_depth(numbered(index))
                except ServiceError as exc:
                    result = exc
                return result, time.monotonic() - started

            async def kill_first() -> float:
                await asyncio.sleep(0.2)
                return await asyncio.to_thread(kill, a)

            *answers, killed = await asyncio.gather(*(timed(n) for n in range(16)), kill_first())
            return [r for r, _ in answers], [t for _, t in answers], killed

    results, elapsed, _ = asyncio.run(main())
    assert all(isinstance(r, DepthResult) for r in results), results
    assert [index_of(r) for r in results] == list(range(16))
    assert {r.broker for r in results} == {a.clients, b.clients}  # some before the kill, the rest after it
    assert max(elapsed) <= BOUND + SLACK, elapsed


def test_a_broker_down_from_the_start_is_passed_over_and_health_all_reports_it(workers_on, brokers):
    b = brokers()
    workers_on([b.workers], count=1)
    wait_for_workers(b, 1)
    down = f"tcp://127.0.0.1:{free_port()}"
    with Client([down, b.clients], key=KEY, timeout=2.0, retries=0) as client:
        started = time.monotonic()
        result = client.relative_depth(numbered(5))
        assert index_of(result) == 5 and result.broker == b.clients
        assert time.monotonic() - started < 1.5  # a short wait for the first in the list, not a timeout
        started = time.monotonic()
        report = client.health_all()
        assert time.monotonic() - started <= 2.0 + SLACK  # min(timeout, 5) for the broker that is down
    first, second = report["brokers"]
    assert first["address"] == down and first["code"] == "unreachable" and down in first["error"] and "health" not in first
    assert second["address"] == b.clients and second["health"]["workers"] and "error" not in second


def test_with_every_broker_down_calls_fail_naming_each_within_min_timeout_5():
    down = [f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"]
    with Client(down, key=KEY, timeout=1.5, retries=3) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnreachable) as info:
            client.relative_depth(numbered(0))
        assert 1.5 - 0.05 <= time.monotonic() - started <= 1.5 + SLACK
    message = str(info.value)
    assert "any of the 2 brokers" in message and all(address in message for address in down)
    assert info.value.details["addresses"] == down

    async def main() -> None:
        async with AsyncClient(",".join(down), key=KEY, timeout=1.0) as client:
            with pytest.raises(BrokerUnreachable):
                await client.relative_depth(numbered(0))
            report = await client.health_all()
            assert [entry["code"] for entry in report["brokers"]] == ["unreachable", "unreachable"]

    asyncio.run(main())


def test_health_all_of_one_broker_is_a_list_of_one_and_health_keeps_its_map(brokers):
    a = brokers()
    with Client(a.clients, key=KEY, timeout=5) as client:
        single = client.health()
        report = client.health_all()
    assert "brokers" not in single and "workers" in single
    assert [entry["address"] for entry in report["brokers"]] == [a.clients]
    assert set(report["brokers"][0]["health"]) == set(single)


def test_addresses_as_a_list_or_a_comma_separated_string():
    for given in (["127.0.0.1:5555", "tcp://other:6000"], "127.0.0.1:5555, other:6000", ("127.0.0.1:5555,other:6000",)):
        for cls in (Client, AsyncClient):
            client = cls(given, key="k")
            assert client.addresses == ("tcp://127.0.0.1:5555", "tcp://other:6000")
            assert client.address == "tcp://127.0.0.1:5555,tcp://other:6000"
            assert cls(client.address).addresses == client.addresses  # the joined form is accepted back
    assert Client("gpu-box:5555").addresses == ("tcp://gpu-box:5555",) and Client("gpu-box:5555").address == "tcp://gpu-box:5555"
    with pytest.raises(ConfigError, match="twice"):
        Client("a:5555,tcp://a:5555")
    with pytest.raises(ConfigError, match="not an address"):
        Client(["a:5555", "lab"])
    with pytest.raises(ConfigError, match="empty address"):
        Client("a:5555,,b:5555")
    with pytest.raises(ConfigError, match="no port"):
        Client(["a:5555", "b:"])
    with pytest.raises(ConfigError):
        Client([])


def test_a_profile_with_several_addresses_names_every_broker(tmp_path, monkeypatch):
    config = tmp_path / "profiles.toml"
    config.write_text('[lab]\naddress = "tcp://a:5555"\nkey = "k"\n')
    config.chmod(0o600)
    monkeypatch.setenv("ZDEPTH_CONFIG", str(config))
    assert Client("lab").addresses == ("tcp://a:5555",)
    # A profile may name several brokers (profiles.Profile.addresses): every one is used, in order.
    from zdepth import profiles

    if "addresses" not in getattr(profiles, "FIELDS", ()):
        pytest.skip("this checkout's profiles take one address")
    config.write_text('[lab]\naddresses = ["tcp://a:5555", "b:5556"]\nkey = "k"\n')
    client = Client("lab")
    assert client.addresses == ("tcp://a:5555", "tcp://b:5556") and client.profile == "lab"
    assert Client.from_profile("lab").addresses == client.addresses


def test_zdepth_health_shows_each_broker_and_fails_when_one_is_down(tmp_path):
    """`zdepth health --server a,b`: every broker's table; exit 1 when any is down (a dead standby shows in scripts)."""
    import json
    import subprocess
    import sys

    from procs import child_env

    first, second = start_broker(tmp_path), start_broker(tmp_path)
    argv = [sys.executable, "-m", "zdepth", "health", "--server", f"{first.clients},{second.clients}", "--json"]
    env = child_env(ZDEPTH_KEY=KEY)
    try:
        both = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert both.returncode == 0, both.stderr
        assert [b["address"] for b in json.loads(both.stdout)["brokers"]] == [first.clients, second.clients]
        second.stop(signal.SIGKILL)
        one = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert one.returncode == 1
        brokers = json.loads(one.stdout)["brokers"]
        assert "health" in brokers[0] and "cannot reach the broker" in brokers[1]["error"]
    finally:
        first.stop(signal.SIGKILL)
        second.stop(signal.SIGKILL)
