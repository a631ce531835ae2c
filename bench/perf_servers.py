"""The gRPC baselines of the performance benchmark, built from the service's own parts.

    python -m bench.perf_servers canned --port 50061 --documents 20
    python -m bench.perf_servers proxy --port 50062 --upstream-url http://127.0.0.1:8080
    python -m bench.perf_servers proxy-aiohttp --port 50063 --upstream-url http://127.0.0.1:8080

- canned: a `grpc.aio` servicer that answers every Rerank with one fixed
  `RerankResponse` of the same size as the service's answer, built once. The limit
  of the gRPC stack (grpcio's asyncio server, protobuf), with nothing behind it.
  With `--delay`, it sleeps (asyncio.sleep) that long first: the gRPC stack's limit
  in front of a slow upstream.
- proxy: a `grpc.aio` servicer that does one httpx POST to the upstream (DashScope
  native body), parses the JSON and builds the response: nothing else (no checks,
  no logging, no auth, no deadline handling, no retries). The limit of a proxy built
  on grpc.aio and httpx.
- proxy-aiohttp: the same proxy on the service's own parts: aiohttp's client (one
  `ClientSession`, a pool of `--max-connections`) and orjson. The floor under the
  service: what one upstream call costs on its stack with none of its features.

Both use the default asyncio event loop and grpc.aio's defaults, as the service does.
The `proxy` kind's HTTP client is httpx, or the httpx-compatible library BENCH_HTTPX names.
They print one line, `serving on HOST:PORT`, once they accept calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator

import aiohttp
import grpc
import orjson
from grpc.aio import ServicerContext
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from bench.perf_payloads import (
    RERANK_PATH,
    UPSTREAM_KEY,
    canned_response,
    http_client_library,
    response_from,
    upstream_request,
)

Context = ServicerContext[rerank_pb2.RerankRequest, rerank_pb2.RerankResponse]
StreamContext = ServicerContext[rerank_pb2.RerankStreamRequest, rerank_pb2.RerankStreamResponse]


class _RerankOnly(rerank_pb2_grpc.RerankServiceServicer):
    """Only Rerank is measured; the other methods answer UNIMPLEMENTED."""

    async def RerankStream(
        self, request_iterator: AsyncIterator[rerank_pb2.RerankStreamRequest], context: StreamContext
    ) -> AsyncIterator[rerank_pb2.RerankStreamResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not a benchmark baseline's method")
        yield  # type: ignore[unreachable]  # abort raises; the yield makes this a stream handler

    async def ListModels(
        self,
        request: rerank_pb2.ListModelsRequest,
        context: ServicerContext[rerank_pb2.ListModelsRequest, rerank_pb2.ListModelsResponse],
    ) -> rerank_pb2.ListModelsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not a benchmark baseline's method")


class Canned(_RerankOnly):
    def __init__(self, documents: int, delay: float) -> None:
        self._response = canned_response(documents)
        self._delay = delay

    async def Rerank(self, request: rerank_pb2.RerankRequest, context: Context) -> rerank_pb2.RerankResponse:
        if self._delay:
            await asyncio.sleep(self._delay)
        return self._response


class MinimalProxy(_RerankOnly):
    def __init__(self, upstream_url: str, max_connections: int) -> None:
        httpx = http_client_library()
        self._client = httpx.AsyncClient(
            base_url=upstream_url,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(30.0),
            headers={"authorization": f"Bearer {UPSTREAM_KEY}", "content-type": "application/json"},
            trust_env=False,
        )

    async def Rerank(self, request: rerank_pb2.RerankRequest, context: Context) -> rerank_pb2.RerankResponse:
        body = upstream_request(request)
        reply = await self._client.post(RERANK_PATH, content=json.dumps(body, ensure_ascii=False).encode())
        answer = json.loads(reply.content)
        return response_from(answer)

    async def close(self) -> None:
        await self._client.aclose()


class MinimalAiohttpProxy(_RerankOnly):
    def __init__(self, upstream_url: str, max_connections: int) -> None:
        self._url = upstream_url.rstrip("/") + RERANK_PATH
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on the first call: a ClientSession belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                headers={"authorization": f"Bearer {UPSTREAM_KEY}", "content-type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=30.0),
            )
        return self._session

    async def Rerank(self, request: rerank_pb2.RerankRequest, context: Context) -> rerank_pb2.RerankResponse:
        body = upstream_request(request)
        async with self._client().post(self._url, data=orjson.dumps(body)) as reply:
            answer = orjson.loads(await reply.read())
        return response_from(answer)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


Servicer = Canned | MinimalProxy | MinimalAiohttpProxy


async def serve(servicer: Servicer, host: str, port: int) -> None:
    server = grpc.aio.server()
    rerank_pb2_grpc.add_RerankServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"serving on {host}:{port}", flush=True)
    await stop.wait()
    await server.stop(1)
    if isinstance(servicer, MinimalProxy | MinimalAiohttpProxy):
        await servicer.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=("canned", "proxy", "proxy-aiohttp"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--documents", type=int, default=20, help="canned: results in the fixed answer")
    parser.add_argument("--delay", type=float, default=0.0, help="canned: seconds to wait before answering")
    parser.add_argument("--upstream-url", default="http://127.0.0.1:8080", help="proxy: the upstream")
    parser.add_argument(
        "--max-connections", type=int, default=1024, help="proxies: pool size (the service's default)"
    )
    args = parser.parse_args()
    servicer: Servicer
    if args.kind == "canned":
        servicer = Canned(args.documents, args.delay)
    elif args.kind == "proxy":
        servicer = MinimalProxy(args.upstream_url, args.max_connections)
    else:
        servicer = MinimalAiohttpProxy(args.upstream_url, args.max_connections)
    asyncio.run(serve(servicer, args.host, args.port))


if __name__ == "__main__":
    main()
