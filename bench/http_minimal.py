"""The minimal rerank handler of `make bench-http`'s library comparison, shared by its two servers.

Parse the Cohere body, one httpx POST to the upstream, JSON parse, answer; or the same with
the upstream's answer canned (fetched once at start). `bench.http_aiohttp` serves it on
aiohttp (in .venv), `bench.http_starlette` on uvicorn + Starlette (in .venv-litellm), so this
module imports only the standard library and httpx, which both environments install
(tests/unit/test_bench_entry_points.py checks it).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx

FRONT_DOOR_PATH = "/v1/rerank"  # the Cohere route of the front door; LiteLLM serves it too
CANNED_PATH = "/canned/v1/rerank"  # the handler without the upstream call


def upstream_body(body: dict[str, Any]) -> bytes:
    """The Cohere body forwarded upstream: the fields a rerank needs, nothing checked."""
    forwarded = {"model": body["model"], "query": body["query"], "documents": body["documents"]}
    if body.get("top_n") is not None:
        forwarded["top_n"] = body["top_n"]
    return json.dumps(forwarded, ensure_ascii=False).encode()


def answer(upstream: dict[str, Any]) -> bytes:
    """The Cohere answer built from the upstream's (as the front door's Cohere route answers)."""
    built = {
        "id": upstream["id"],
        "results": upstream["results"],
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
        "usage": upstream.get("usage"),
    }
    return json.dumps(built).encode()


def canned(upstream_url: str, upstream_path: str) -> bytes:
    """The upstream's answer, fetched once (nginx answers the same body to every call)."""
    reply = httpx.post(upstream_url + upstream_path, content=b"{}", timeout=30, trust_env=False)
    reply.raise_for_status()
    return reply.content


def client(upstream_url: str) -> httpx.AsyncClient:
    """The upstream client: httpx, a pool of 1,024 connections (the service's default)."""
    return httpx.AsyncClient(
        base_url=upstream_url,
        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024),
        timeout=httpx.Timeout(30.0),
        headers={"content-type": "application/json"},
        trust_env=False,
    )


def arguments(description: str | None) -> argparse.Namespace:
    """The command line both servers take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-url", required=True)
    parser.add_argument("--upstream-path", default="/v1/rerank")
    return parser.parse_args()
