"""The upstream connection pool against a real HTTP server: reuse, bounds, release."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from rerank_service.backends.upstream.client.pool import LeanConnectionPool as LeanPool
from rerank_service.backends.upstream.client.transport import pooled_transport
from rerank_service.testing.fake_upstream import NATIVE_PATH, FakeUpstream, Fault
from tests.support.certs import CertificateAuthority
from tests.support.waiting import wait_until_async

BODY = {"model": "qwen3-rerank", "input": {"query": "a b", "documents": ["a b c", "d"]}}


@pytest.fixture
async def client(upstream: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    upstream.api_key = None
    async with httpx.AsyncClient(base_url=upstream.url, transport=pooled_transport(3), timeout=5) as http:
        yield http


def pool_of(client: httpx.AsyncClient) -> LeanPool:
    transport = client._transport
    assert isinstance(transport, httpx.AsyncHTTPTransport)
    return pool_of_transport(transport)


def pool_of_transport(transport: httpx.AsyncHTTPTransport) -> LeanPool:
    pool: object = transport._pool  # httpx annotates it as httpcore's own pool
    assert isinstance(pool, LeanPool)
    return pool


async def post(client: httpx.AsyncClient) -> int:
    response = await client.post(NATIVE_PATH, json=BODY)
    return response.status_code


async def test_sequential_calls_reuse_one_connection(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    before = upstream.connections_accepted
    statuses = [await post(client) for _ in range(5)]

    assert statuses == [200] * 5
    assert pool_of(client).connections == 1
    assert upstream.connections_accepted - before == 1


async def test_concurrent_calls_never_open_more_connections_than_allowed(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(delay=0.05))
    before = upstream.connections_accepted

    statuses = await asyncio.gather(*(post(client) for _ in range(12)))

    assert statuses == [200] * 12
    assert upstream.max_in_flight == 3
    assert pool_of(client).connections == 3
    assert upstream.connections_accepted - before == 3


async def test_a_caller_waiting_longer_than_the_pool_timeout_gets_a_pool_timeout(
    upstream: FakeUpstream,
) -> None:
    upstream.api_key = None
    upstream.always(Fault(delay=0.5))
    async with httpx.AsyncClient(base_url=upstream.url, transport=pooled_transport(1)) as client:
        busy = asyncio.create_task(client.post(NATIVE_PATH, json=BODY, timeout=5))
        await wait_until_async(
            lambda: len(upstream.requests) == 1, what="the busy call holding the connection"
        )
        with pytest.raises(httpx.PoolTimeout):
            await client.post(NATIVE_PATH, json=BODY, timeout=httpx.Timeout(5, pool=0.1))
        assert (await busy).status_code == 200


async def test_a_response_left_unread_frees_its_slot_and_drops_its_connection(
    upstream: FakeUpstream,
) -> None:
    upstream.api_key = None
    before = upstream.connections_accepted
    async with httpx.AsyncClient(base_url=upstream.url, transport=pooled_transport(1), timeout=5) as client:
        async with client.stream("POST", NATIVE_PATH, json=BODY) as response:
            assert response.status_code == 200  # closed without reading the body
        assert await post(client) == 200  # the only slot came back
        assert pool_of(client).connections == 1
    assert upstream.connections_accepted - before == 2  # the unread one could not be reused


async def test_a_cancelled_call_frees_its_slot(upstream: FakeUpstream) -> None:
    upstream.api_key = None
    upstream.inject(Fault(delay=5))
    async with httpx.AsyncClient(base_url=upstream.url, transport=pooled_transport(1), timeout=10) as client:
        slow = asyncio.create_task(post(client))
        await wait_until_async(lambda: len(upstream.requests) == 1, what="the slow call holding the slot")
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert await asyncio.wait_for(post(client), 2) == 200


async def test_a_connection_the_server_closed_is_not_reused(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    upstream.inject(Fault(headers={"connection": "close"}))
    before = upstream.connections_accepted

    assert [await post(client) for _ in range(3)] == [200, 200, 200]
    assert upstream.connections_accepted - before == 2


async def test_closing_the_client_closes_every_connection(upstream: FakeUpstream) -> None:
    upstream.api_key = None
    upstream.always(Fault(delay=0.05))
    async with httpx.AsyncClient(base_url=upstream.url, transport=pooled_transport(4), timeout=5) as client:
        await asyncio.gather(*(post(client) for _ in range(4)))
        pool = pool_of(client)
        assert pool.connections == 4
    assert pool.connections == 0


async def test_an_https_upstream_is_reached_through_the_tls_handshake(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The hosted API is HTTPS: the pool's asyncio network layer upgrades the connection."""
    ca = CertificateAuthority()
    cert, key = ca.issue_server().write(tmp_path, "upstream")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(ca.write(tmp_path)))
    upstream.api_key = None
    host, port = upstream.url.removeprefix("http://").split(":")
    # A TLS terminator in front of the fake: decrypts and relays bytes both ways.

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        inner_reader, inner_writer = await asyncio.open_connection(host, int(port))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, inner_writer), pump(inner_reader, writer), return_exceptions=True)

    terminator = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=server_context)
    tls_port = terminator.sockets[0].getsockname()[1]
    transport = pooled_transport(2, ssl_context=client_context)
    try:
        async with httpx.AsyncClient(base_url=f"https://localhost:{tls_port}", transport=transport) as client:
            answers = [await client.post(NATIVE_PATH, json=BODY, timeout=5) for _ in range(3)]
    finally:
        terminator.close()

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert answers[0].json()["output"]["results"][0]["index"] == 0
    assert answers[0].extensions["network_stream"].get_extra_info("ssl_object") is not None
