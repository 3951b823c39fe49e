"""AsyncClient against the fake server of test_client.py: the same basics, plus concurrent calls on one socket."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import numpy as np
import pytest

from test_client import (
    INTRINSICS,
    answer,
    depth_reply,
    error_reply,
    fake_depth,
    frame,
    pixels,
    reverse_batches,
    serve,  # noqa: F401  (fixture)
)
from zdepth import AsyncClient
from zdepth.client import ClientState
from zdepth.client.results import DepthResult, PointCloudResult
from zdepth.errors import DeadlineExceeded, Unauthorized, UnknownModel
from zdepth.pointcloud import depth_to_points

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(coro)


def test_relative_and_metric_depth(serve):
    server = serve()
    image = frame(1)

    async def main():
        async with AsyncClient(server.address, key="k", depth_dtype="float16") as client:
            assert client.state is ClientState.OPENED
            relative = await client.relative_depth(image, input_size=280)
            metric = await client.metric_depth(image, encoder="vitl", max_depth=4.0)
        assert client.state is ClientState.CLOSED
        return relative, metric

    relative, metric = run(main())
    first, second = server.requests
    assert (first.header["op"], first.header["model"], first.header["key"]) == ("relative_depth", "vits", "k")
    assert first.params.input_size == 280 and first.params.depth_dtype == "float16"
    assert (second.header["model"], second.params.max_depth) == ("vitl-hypersim", 4.0)
    assert isinstance(relative, DepthResult) and relative.depth.dtype == np.float32
    np.testing.assert_array_equal(metric.depth, fake_depth(image).astype(np.float16).astype(np.float32))
    assert metric.timings["round_trip_ms"] > 0


def test_health_legacy_and_jpeg(serve):
    server = serve()

    async def main():
        async with AsyncClient(server.address, wire_format="jpeg") as client:
            return await client.health(), await client.legacy_relative_depth(frame())

    health, legacy = run(main())
    assert health["status"] == "ok"
    rec = server.requests[1]
    assert (rec.header["op"], rec.params.max_depth, rec.params.image) == ("metric_depth", 1.0, {"format": "encoded"})


@pytest.mark.parametrize("code, error", [("unauthorized", Unauthorized), ("unknown_model", UnknownModel)])
def test_error_reply_raises_typed_exception(serve, code, error):
    server = serve(lambda s, rec: [(rec, error_reply(rec, code, "nope"))])

    async def main():
        async with AsyncClient(server.address) as client:
            with pytest.raises(error, match="nope"):
                await client.relative_depth(frame())

    run(main())


def test_concurrent_calls_share_one_socket(serve):
    server = serve(reverse_batches(5))
    frames = [frame(i) for i in range(5)]

    async def main():
        async with AsyncClient(server.address, timeout=5) as client:
            return await asyncio.gather(*(client.metric_depth(f) for f in frames))

    results = run(main())
    for image, result in zip(frames, results):
        np.testing.assert_array_equal(result.depth, fake_depth(image))
    assert len({rec.identity for rec in server.requests}) == 1


def test_lost_replies_are_resent_each_with_a_new_id(serve):
    # The first two requests are lost; each is resent once, on the same socket, with a new id.
    def handler(server, rec):
        if len(server.requests) <= 2:
            return None
        return [(rec, answer(rec))]

    server = serve(handler)

    async def main():
        async with AsyncClient(server.address, timeout=0.3, retries=1) as client:
            return await asyncio.gather(client.relative_depth(frame(1)), client.relative_depth(frame(2)))

    first, second = run(main())
    np.testing.assert_array_equal(first.depth, fake_depth(frame(1)))
    np.testing.assert_array_equal(second.depth, fake_depth(frame(2)))
    assert len(server.requests) == 4 and len({rec.id for rec in server.requests}) == 4
    assert len({rec.identity for rec in server.requests}) == 1


def test_no_reply_raises_deadline_exceeded_in_bounded_time(serve):
    server = serve(lambda s, rec: None)

    async def main():
        async with AsyncClient(server.address, timeout=0.2, retries=1) as client:
            with pytest.raises(DeadlineExceeded, match=server.address):
                await client.relative_depth(frame())

    start = time.monotonic()
    run(main())
    assert 0.4 <= time.monotonic() - start < 3.0
    deadline = time.monotonic() + 2.0  # the server's thread records the retry a moment after it arrives
    while len(server.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.requests) == 2


def test_wait_ready(serve):
    server = serve()  # answers health with one worker serving vits

    async def main():
        async with AsyncClient(server.address) as client:
            health = await client.wait_ready(timeout=10, model="vits")
            with pytest.raises(DeadlineExceeded, match="ready for vitl"):
                await client.wait_ready(timeout=0.2, model="vitl")
        return health

    assert run(main())["models"] == ["vits"]


def test_pointcloud_client_side_and_on_server(serve):
    server = serve()
    image = frame(3)

    async def main():
        async with AsyncClient(server.address) as client:
            return await client.pointcloud(image, INTRINSICS), await client.pointcloud(image, INTRINSICS, on_server=True)

    local, remote = run(main())
    points, rgb = depth_to_points(fake_depth(image), INTRINSICS, colors=image)
    for result in (local, remote):
        assert isinstance(result, PointCloudResult)
        np.testing.assert_array_equal(result.points, points)
        np.testing.assert_array_equal(result.colors, rgb)
    assert [rec.header["op"] for rec in server.requests] == ["metric_depth", "pointcloud"]


def test_stream_in_order_from_list_generator_and_async_iterable(serve):
    server = serve(reverse_batches(3))
    frames = [frame(i) for i in range(6)]

    async def agen():
        for f in frames:
            yield f

    async def main():
        async with AsyncClient(server.address, timeout=5) as client:
            out = []
            for source in (frames, iter(frames), agen()):
                out.append([r async for r in client.stream(source, max_in_flight=3)])
            return out

    for results in run(main()):
        assert [r.index for r in results] == list(range(6))
        for image, result in zip(frames, results):
            np.testing.assert_array_equal(result.depth, fake_depth(image))
    assert server.max_outstanding == 3


def test_stream_latest_only_sends_the_newest_frame(serve):
    first_received, produced = threading.Event(), threading.Event()

    def handler(server, rec):
        if len(server.requests) == 1:
            first_received.set()
            assert produced.wait(5)
        return [(rec, answer(rec))]

    async def source():
        yield frame(0)
        while not first_received.is_set():
            await asyncio.sleep(0.005)
        for i in (1, 2, 3):
            yield frame(i)
        produced.set()

    server = serve(handler)

    async def main():
        async with AsyncClient(server.address, timeout=5) as client:
            async with contextlib.aclosing(client.stream(source(), max_in_flight=1, latest_only=True)) as stream:
                return [r.index async for r in stream]

    assert run(main()) == [0, 3]
    assert [rec.frames[2] for rec in server.requests] == [frame(0).tobytes(), frame(3).tobytes()]


def test_stream_return_exceptions(serve):
    def handler(server, rec):
        if rec.frames[2:] == [frame(1).tobytes()]:
            return [(rec, error_reply(rec, "bad_request", "odd frame"))]
        return [(rec, depth_reply(rec, fake_depth(pixels(rec))))]

    server = serve(handler)

    async def main():
        async with AsyncClient(server.address) as client:
            return [r async for r in client.stream([frame(i) for i in range(3)], return_exceptions=True)]

    results = run(main())
    assert isinstance(results[1], ValueError) and "odd frame" in str(results[1])
    assert [results[0].index, results[2].index] == [0, 2]


def test_closing_fails_waiting_calls_and_blocks_reuse(serve):
    server = serve(lambda s, rec: None)

    async def main():
        client = AsyncClient(server.address, timeout=5)
        call = asyncio.ensure_future(client.relative_depth(frame()))
        while not server.requests:
            await asyncio.sleep(0.01)
        await client.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await call
        with pytest.raises(RuntimeError, match="closed"):
            await client.health()

    start = time.monotonic()
    run(main())
    assert time.monotonic() - start < 3.0
