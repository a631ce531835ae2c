"""What one call costs the event loop in tasks: none of the service's own.

A task is a loop turn or more and a few microseconds of scheduling on every call. The
libraries make theirs (grpc.aio three per unary call, aiohttp's server one per HTTP
request, aiohttp's client one per upstream request, to write its body: started eagerly,
without a loop turn, from Python 3.12); the service's own path awaits what it calls
directly and makes none. These tests count
the tasks a call makes, by whose code they run, so a change that adds one fails here
(docs/PERFORMANCE.md says what a call costs).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any

import httpx
import pytest

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import upstream_settings
from tests.support.rpc import request
from tests.support.server import ServerThread

WARM_UP, MEASURED = 3, 10
# aiohttp's client writes the upstream request's body in a task of its own.
UPSTREAM_BODY_WRITER = "ClientRequest.write_bytes (aiohttp)"


class TaskCount:
    """The tasks made on a server's loop, by the qualified name of their coroutine."""

    def __init__(self) -> None:
        self.made: Counter[str] = Counter()

    def factory(
        self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        code = coro.cr_code if hasattr(coro, "cr_code") else None
        where = "" if code is None else code.co_filename
        self.made[f"{getattr(coro, '__qualname__', coro)} ({_package(where)})"] += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    def per_call(self) -> dict[str, float]:
        return {name: count / MEASURED for name, count in self.made.items()}


def _package(path: str) -> str:
    for package in ("rerank_service", "grpc", "aiohttp", "httpx", "httpcore"):
        if f"/{package}/" in path:
            return package
    return path


@pytest.fixture
def counted(upstream: FakeUpstream) -> Iterator[tuple[ServerThread, TaskCount]]:
    count = TaskCount()
    with ServerThread(upstream_settings(upstream, http_port=0)) as server:

        async def install() -> None:
            asyncio.get_running_loop().set_task_factory(count.factory)  # type: ignore[arg-type]

        server.run(install())
        yield server, count


def test_a_grpc_call_makes_only_its_libraries_tasks(counted: tuple[ServerThread, TaskCount]) -> None:
    server, count = counted
    for _ in range(WARM_UP):  # connections, pools and caches made once
        server.stub.Rerank(request(), timeout=10)
    count.made.clear()
    for _ in range(MEASURED):
        server.stub.Rerank(request(), timeout=10)

    assert count.per_call() == {
        "_schedule_rpc_coro (grpc)": 1.0,
        "AioServer._request_call (grpc)": 1.0,
        "_handle_exceptions (grpc)": 1.0,
        UPSTREAM_BODY_WRITER: 1.0,
    }


def test_an_http_call_makes_only_its_libraries_tasks(counted: tuple[ServerThread, TaskCount]) -> None:
    server, count = counted
    assert server.server is not None
    assert server.server.http is not None
    url = f"http://127.0.0.1:{server.server.http.port}/v1/rerank"
    body = {"model": "qwen3-rerank", "query": "red apple", "documents": ["a red apple", "a green pear"]}
    with httpx.Client(timeout=10) as client:  # one keep-alive connection, as a client's pool
        for _ in range(WARM_UP):
            assert client.post(url, json=body).status_code == 200
        count.made.clear()
        for _ in range(MEASURED):
            assert client.post(url, json=body).status_code == 200

    assert count.per_call() == {"RequestHandler._handle_request (aiohttp)": 1.0, UPSTREAM_BODY_WRITER: 1.0}
