"""Depth for several images at once from asyncio: one AsyncClient, many concurrent requests.

    python examples/async_client.py a.jpg b.jpg c.jpg --server tcp://gpu-box:5555

Every call is a coroutine; ``asyncio.gather`` keeps them all in flight on one
socket, and the broker spreads them over the workers. The second half shows
``stream``, which yields results in order with a bounded number in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from zdepth import ZdepthError
from zdepth.client.aio import AsyncClient


def connect(server: str, **options) -> AsyncClient:
    if "://" in server:
        return AsyncClient(server, **options)
    return AsyncClient.from_profile(server, **options)


async def run(args: argparse.Namespace) -> int:
    async with connect(args.server, encoder=args.model, input_size=args.input_size) as client:
        health = await client.health()
        workers = health.get("workers", [])
        print(f"{args.server}: {len(workers)} worker(s), models {', '.join(health.get('models', [])) or '(none)'}")

        started = time.perf_counter()
        results = await asyncio.gather(*(client.relative_depth(path) for path in args.images), return_exceptions=True)
        elapsed = time.perf_counter() - started
        failed = 0
        for path, result in zip(args.images, results):
            if isinstance(result, BaseException):
                failed += 1
                print(f"{path}: failed: {result}")
            else:
                print(f"{path}: {result.shape[1]}x{result.shape[0]}, {result.timings['round_trip_ms']:.1f} ms, worker {result.worker}")
        print(f"gather: {len(results)} request(s) in {elapsed * 1000:.0f} ms")

        count = 0
        async for result in client.stream(args.images, max_in_flight=args.in_flight, return_exceptions=True):
            count += not isinstance(result, BaseException)
        print(f"stream: {count} of {len(args.images)} result(s), in order")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--server", default=os.environ.get("ZDEPTH_SERVER", "tcp://localhost:5555"), help="address or profile name")
    parser.add_argument("--model", default="vits", help="a relative model: vits, vitb or vitl")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    try:
        return asyncio.run(run(args))
    except ZdepthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
