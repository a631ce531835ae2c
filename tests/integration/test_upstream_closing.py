"""An upstream backend closed under its calls (a reload dropped its deployment and
--shutdown-grace ran out): a call that comes while aiohttp closes its session is refused
as a backend not ready (UNAVAILABLE BACKEND_NOT_READY: it falls back), never sent to the
closing session, whose RuntimeError("Session is closed") would end it INTERNAL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import grpc
import pytest

from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.backends.upstream.client import exchange
from rerank_service.backends.upstream.client.connections import HANDED_OUT, CountingHandler
from rerank_service.backends.upstream.client.transport import UpstreamTransport
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.core.domain import BackendRequest, CallContext, ServiceError
from rerank_service.testing.fake_upstream import NATIVE_PATH, FakeUpstream
from tests.conftest import upstream_settings

BODY = {"model": "qwen3-rerank", "input": {"query": "a b", "documents": ["a b c", "d"]}}
REQUEST = BackendRequest(model="qwen3-rerank", query="a b", documents=["a b c"], instruct=None, top_n=None)

# No proxy or CA bundle from the machine running the tests (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("clean_network_environment")


class HeldClose:
    """aiohttp's session close, held once the session is closed until `let_go` is set: the
    await during which a closing backend still had its transport."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.closed = asyncio.Event()
        self.let_go = asyncio.Event()
        close = aiohttp.ClientSession.close

        async def held(session: aiohttp.ClientSession) -> None:
            await close(session)
            self.closed.set()
            await self.let_go.wait()

        monkeypatch.setattr(aiohttp.ClientSession, "close", held)

    async def during(self, closing: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """`closing` started and left where the session is closed, its close not returned."""
        task = asyncio.create_task(closing)
        await asyncio.wait_for(self.closed.wait(), 10)  # a guard against a hang only
        return task


@pytest.fixture
async def backend(upstream: FakeUpstream) -> AsyncIterator[UpstreamBackend]:
    built = UpstreamBackend.from_config(
        UpstreamDeploymentConfig.from_settings(upstream_settings(upstream, upstream_max_attempts=1))
    )
    await built.start()
    await built.rerank(REQUEST, CallContext())  # its session opened
    yield built
    await built.close()


async def test_a_call_that_comes_while_the_backend_closes_is_refused_as_not_ready(
    backend: UpstreamBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldClose(monkeypatch)
    closing = await held.during(backend.close())
    try:
        # The router and the health checks see it closed from the close's first step on.
        assert not backend.readiness.ready
        with pytest.raises(ServiceError) as caught:
            await backend.rerank(REQUEST, CallContext())
    finally:
        held.let_go.set()
        await closing

    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "BACKEND_NOT_READY"


async def test_a_transport_whose_session_is_closing_refuses_a_call_as_not_ready(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = UpstreamTransport(upstream.url, 5.0, 4)
    await transport.post_json(NATIVE_PATH, BODY, None, None)  # its session opened
    held = HeldClose(monkeypatch)
    closing = await held.during(transport.close())
    try:
        with pytest.raises(ServiceError) as caught:
            await transport.post_json(NATIVE_PATH, BODY, None, None)
    finally:
        held.let_go.set()
        await closing

    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == "BACKEND_NOT_READY"
    assert len(upstream.requests) == 1


async def test_a_reused_connection_cut_off_by_the_transports_close_is_not_resent(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle-close race is resent once (exchange.py), but not on a session closed under
    the call: that resend would raise aiohttp's RuntimeError (INTERNAL)."""
    transport = UpstreamTransport(upstream.url, 5.0, 4)
    sent: list[float] = []

    async def cut_off_by_the_close(session: aiohttp.ClientSession, *_: object) -> aiohttp.ClientResponse:
        sent.append(time.monotonic())
        kept_alive = CountingHandler(asyncio.get_running_loop())
        kept_alive.handed_out_at = time.monotonic()
        HANDED_OUT.set(kept_alive)  # a kept-alive connection, just handed out
        await session.close()  # the reload's grace ran out: its connection closed unanswered
        raise aiohttp.ServerDisconnectedError()

    post: Callable[..., object] = cut_off_by_the_close
    monkeypatch.setattr(exchange, "_post", post)
    try:
        with pytest.raises(ServiceError) as caught:
            await transport.post_json(NATIVE_PATH, BODY, None, None)
    finally:
        await transport.close()

    assert len(sent) == 1
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
