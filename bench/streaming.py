"""Streaming benchmark: one RerankStream against unary calls, over a 20 ms upstream.

    make bench-streaming          # or: .venv/bin/python -m bench.streaming

A real `rerank-service serve --backend upstream` process in front of the fake
upstream (its own process, answering every call after a fixed 20 ms), all on
loopback. The same 1,000 requests of 20 documents are sent three ways:

1. one RerankStream (the server's default window, 32 in flight);
2. 1,000 sequential unary Rerank calls;
3. 1,000 unary Rerank calls with 32 in flight.

Goal: the stream at least 10x the sequential loop and no slower than the
concurrent unary calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from bench.corpus import documents, queries
from tests.support.process import ServiceProcess

KEY = "bench-upstream-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def workload(count: int) -> list[rerank_pb2.RerankRequest]:
    docs, qs = documents(2000), queries(count)
    return [
        rerank_pb2.RerankRequest(
            model="qwen3-rerank", query=qs[i], documents=docs[(i * 20) % 1980 : (i * 20) % 1980 + 20]
        )
        for i in range(count)
    ]


async def one_stream(
    stub: rerank_pb2_grpc.RerankServiceAsyncStub, requests: list[rerank_pb2.RerankRequest]
) -> float:
    async def items() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        for index, request in enumerate(requests):
            yield rerank_pb2.RerankStreamRequest(id=str(index), request=request)

    started = time.perf_counter()
    answered = 0
    async for response in stub.RerankStream(items(), timeout=600):
        assert response.WhichOneof("result") == "response", response
        answered += 1
    assert answered == len(requests)
    return time.perf_counter() - started


async def unary(
    stub: rerank_pb2_grpc.RerankServiceAsyncStub, requests: list[rerank_pb2.RerankRequest], in_flight: int
) -> float:
    pending = list(reversed(requests))

    async def worker() -> None:
        while pending:
            response = await stub.Rerank(pending.pop(), timeout=60)
            assert len(response.output.results) == 20

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - started


async def measure(target: str, requests: list[rerank_pb2.RerankRequest]) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        await unary(stub, requests[:50], 8)  # warm up connections on both hops
        return {
            "one RerankStream (window 32)": await one_stream(stub, requests),
            "sequential unary calls": await unary(stub, requests, 1),
            "unary calls, 32 in flight": await unary(stub, requests, 32),
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.02, help="upstream latency in seconds")
    args = parser.parse_args()

    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "rerank_service.testing.fake_upstream", "--port", str(port),
         "--latency", str(args.latency), "--api-key", KEY],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        server_args = [
            "--backend",
            "upstream",
            "--upstream-url",
            f"http://127.0.0.1:{port}",
        ]
        with ServiceProcess(server_args, env={"RERANK_UPSTREAM_API_KEY": KEY}) as service:
            seconds = asyncio.run(measure(service.target, workload(args.requests)))
            service.terminate()
    finally:
        upstream.terminate()
        upstream.wait()

    print(f"\nRerankStream vs unary, {args.requests} requests of 20 documents, upstream latency "
          f"{args.latency * 1000:.0f} ms, loopback, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| how | seconds | requests/s |")
    print("| --- | --- | --- |")
    for name, taken in seconds.items():
        print(f"| {name} | {taken:.2f} | {args.requests / taken:.1f} |")
    rates = {name: args.requests / taken for name, taken in seconds.items()}
    stream, sequential, concurrent = rates.values()
    print(f"\nstream / sequential unary: {stream / sequential:.1f}x (goal >= 10x)")
    print(f"stream / 32 concurrent unary: {stream / concurrent:.2f}x (goal >= 1.0x)")


if __name__ == "__main__":
    main()
