"""The minimal rerank handler (bench/http_minimal.py) on aiohttp's server, for `make bench-http`.

    .venv/bin/python -m bench.http_aiohttp --port 8000 --upstream-url http://127.0.0.1:8080

Configured as the front door's server (rerank_service/api/http/server.py). Runs in .venv.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
from aiohttp import web

from bench.http_minimal import CANNED_PATH, FRONT_DOOR_PATH, answer, arguments, canned, client, upstream_body

CLIENT = web.AppKey("client", httpx.AsyncClient)


def serve(host: str, port: int, upstream_url: str, upstream_path: str) -> None:
    fixed = canned(upstream_url, upstream_path)

    async def rerank(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        reply = await request.app[CLIENT].post(upstream_path, content=upstream_body(body))
        return web.Response(body=answer(json.loads(reply.content)), content_type="application/json")

    async def rerank_canned(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        upstream_body(body)
        return web.Response(body=answer(json.loads(fixed)), content_type="application/json")

    async def upstream_client(app: web.Application) -> AsyncIterator[None]:
        app[CLIENT] = upstream = client(upstream_url)
        yield
        await upstream.aclose()

    app = web.Application()
    app.router.add_post(FRONT_DOOR_PATH, rerank)
    app.router.add_post(CANNED_PATH, rerank_canned)
    app.cleanup_ctx.append(upstream_client)
    web.run_app(app, host=host, port=port, access_log=None, keepalive_timeout=15.0, backlog=1024, print=None)


def main() -> None:
    args = arguments(__doc__)
    serve(args.host, args.port, args.upstream_url, args.upstream_path)


if __name__ == "__main__":
    main()
