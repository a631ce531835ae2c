"""The minimal rerank handler (bench/http_minimal.py) on uvicorn + Starlette, for `make bench-http`.

    .venv-litellm/bin/python -m bench.http_starlette --port 8001 --upstream-url http://127.0.0.1:8080

The stdlib asyncio loop (as the front door's), uvicorn's C parser (httptools), no access
log. Runs in .venv-litellm (`make litellm`), which has uvicorn and Starlette but not the
service's packages: this module and what it imports stay within bench/litellm/requirements.txt
(tests/unit/test_bench_entry_points.py checks it; `make bench-http` imports it there first).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import uvicorn  # type: ignore[import-not-found, unused-ignore]
from starlette.applications import Starlette  # type: ignore[import-not-found, unused-ignore]
from starlette.requests import Request  # type: ignore[import-not-found, unused-ignore]
from starlette.responses import Response  # type: ignore[import-not-found, unused-ignore]
from starlette.routing import Route  # type: ignore[import-not-found, unused-ignore]

from bench.http_minimal import CANNED_PATH, FRONT_DOOR_PATH, answer, arguments, canned, client, upstream_body


def serve(host: str, port: int, upstream_url: str, upstream_path: str) -> None:
    state: dict[str, Any] = {}
    fixed = canned(upstream_url, upstream_path)

    async def rerank(request: Request) -> Response:
        body = json.loads(await request.body())
        reply = await state["client"].post(upstream_path, content=upstream_body(body))
        return Response(content=answer(json.loads(reply.content)), media_type="application/json")

    async def rerank_canned(request: Request) -> Response:
        body = json.loads(await request.body())
        upstream_body(body)
        return Response(content=answer(json.loads(fixed)), media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["client"] = client(upstream_url)
        yield
        await state["client"].aclose()

    routes = [
        Route(FRONT_DOOR_PATH, rerank, methods=["POST"]),
        Route(CANNED_PATH, rerank_canned, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="asyncio",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=1024,
        timeout_keep_alive=15,
    )


def main() -> None:
    args = arguments(__doc__)
    serve(args.host, args.port, args.upstream_url, args.upstream_path)


if __name__ == "__main__":
    main()
