"""One HTTP client of `make bench-transports` (bench/transports.py), driven over stdin.

    .venv-transports/bin/python -m bench.transports_client today --url http://127.0.0.1:8080 \
        --path /api/... --body body.json --key KEY

Runs in .venv-transports, which holds every candidate. It builds its client, prints one
JSON line (`{"ready": ..., "versions": ...}`), then for each line `CONCURRENCY SECONDS` on
stdin runs that many callers for that long, each POSTing the body (a JSON object,
serialized per call, as the backend does) and parsing the JSON answer, and prints one
JSON line: calls, errors, wall seconds and the process's CPU seconds (time.process_time,
every thread) over the run. Each run is preceded by a short unmeasured one, so a pool
whose idle connections expired while other clients ran starts the run full.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from bench.transports_candidates import (
    AIOHTTP,
    CANDIDATES,
    HTTPX2,
    HTTPX_AIOHTTP_CLIENT,
    TODAY,
)

MAX_CONNECTIONS = 1024  # the service's default --upstream-max-connections
KEEPALIVE = 30.0  # seconds, as the service's pool (client/connections.py)
SETTLE = 0.3  # seconds of unmeasured calls before each run
# The headers the backend sends (client/exchange.py), the bearer key added.
HEADERS = {
    "content-type": "application/json",
    "accept": "application/json",
    "accept-encoding": "gzip",
    "user-agent": "rerank-service",
}

Call = Callable[[], Coroutine[Any, Any, Any]]


def today(url: str, path: str, body: dict[str, Any], key: str) -> tuple[Call, Call]:
    """The service's own transport (rerank_service/backends/upstream/client/transport.py), as
    the backend calls it: post_json with the key and no caller deadline."""
    from rerank_service.backends.upstream.client.transport import UpstreamTransport
    from rerank_service.config.secret import Secret
    from rerank_service.observability.metrics import Metrics

    upstream = UpstreamTransport(url, 30.0, MAX_CONNECTIONS, metrics=Metrics())
    token = Secret(key)

    async def call() -> Any:
        reply = await upstream.post_json(path, body, token, None)
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}")
        return orjson.loads(reply.content)

    return call, upstream.close


def httpx_aiohttp_transport() -> Any:
    import httpx
    from httpx_aiohttp import AiohttpTransport  # type: ignore[import-not-found, unused-ignore]

    limits = httpx.Limits(
        max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS, keepalive_expiry=KEEPALIVE
    )
    return AiohttpTransport(limits=limits, trust_env=False)


def httpx_like(
    module: Any, url: str, path: str, body: dict[str, Any], key: str, transport: Any = None
) -> tuple[Call, Call]:
    """An httpx-API AsyncClient (httpx or httpx2), its pool as large as the service's."""
    limits = module.Limits(
        max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS, keepalive_expiry=KEEPALIVE
    )
    client = module.AsyncClient(
        base_url=url,
        headers={**HEADERS, "authorization": f"Bearer {key}"},
        timeout=module.Timeout(30.0),
        limits=limits,
        trust_env=False,
        transport=transport,
    )

    async def call() -> Any:
        reply = await client.post(path, content=orjson.dumps(body))
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}")
        return orjson.loads(reply.content)

    return call, client.aclose


def aiohttp_session(url: str, path: str, body: dict[str, Any], key: str) -> tuple[Call, Call]:
    """aiohttp's ClientSession directly: its pool (TCPConnector) and C parser."""
    import aiohttp

    session = aiohttp.ClientSession(
        base_url=url,
        connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE),
        headers={**HEADERS, "authorization": f"Bearer {key}"},
        timeout=aiohttp.ClientTimeout(total=30.0),
    )

    async def call() -> Any:
        async with session.post(path, data=orjson.dumps(body)) as reply:
            content = await reply.read()
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}")
        return orjson.loads(content)

    return call, session.close


def client(candidate: str, url: str, path: str, body: dict[str, Any], key: str) -> tuple[Call, Call]:
    """(one call, close) of `candidate`; built inside the running loop (aiohttp wants one)."""
    if candidate == TODAY:
        return today(url, path, body, key)
    if candidate == AIOHTTP:
        return aiohttp_session(url, path, body, key)
    if candidate == HTTPX2:
        import httpx2

        return httpx_like(httpx2, url, path, body, key)
    import httpx

    transport = httpx_aiohttp_transport() if candidate == HTTPX_AIOHTTP_CLIENT else None
    return httpx_like(httpx, url, path, body, key, transport)


async def load(call: Call, concurrency: int, seconds: float, expected: int) -> tuple[int, int]:
    """`concurrency` callers in a loop for `seconds`: (answered calls, failed calls)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    answered = failed = 0

    async def caller() -> None:
        nonlocal answered, failed
        while loop.time() < deadline:
            try:
                answer = await call()
            except Exception:
                failed += 1
                continue
            if len(answer["output"]["results"]) == expected:
                answered += 1
            else:
                failed += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return answered, failed


async def measure(call: Call, concurrency: int, seconds: float, expected: int) -> dict[str, float]:
    await load(call, concurrency, SETTLE, expected)
    cpu, wall = time.process_time(), time.perf_counter()
    answered, failed = await load(call, concurrency, seconds, expected)
    return {
        "calls": answered,
        "errors": failed,
        "cpu": time.process_time() - cpu,
        "wall": time.perf_counter() - wall,
    }


def versions() -> dict[str, str]:
    names = (
        "httpx",
        "httpcore",
        "h11",
        "aiohttp",
        "httpx-aiohttp",
        "httpx2",
        "httpcore2",
        "orjson",
    )
    return {name: metadata.version(name) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("candidate", choices=CANDIDATES)
    parser.add_argument("--url", required=True, help="the upstream's base URL")
    parser.add_argument("--path", required=True, help="the path POSTed to")
    parser.add_argument("--body", type=Path, required=True, help="the JSON body (an object)")
    parser.add_argument("--key", required=True, help="the bearer key sent")
    parser.add_argument("--documents", type=int, required=True, help="results each answer must hold")
    args = parser.parse_args()
    body = orjson.loads(args.body.read_bytes())
    with asyncio.Runner() as runner:

        async def build() -> tuple[Call, Call]:
            return client(args.candidate, args.url, args.path, body, args.key)

        call, close = runner.run(build())
        ready = {"ready": args.candidate, "versions": versions()}
        print(orjson.dumps(ready).decode(), flush=True)
        for line in sys.stdin:
            concurrency, seconds = line.split()
            result = runner.run(measure(call, int(concurrency), float(seconds), args.documents))
            print(orjson.dumps(result).decode(), flush=True)
        runner.run(close())


if __name__ == "__main__":
    main()
