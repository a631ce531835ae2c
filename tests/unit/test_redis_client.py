"""The Redis client both the score cache's tier and the callers' limits use, against a real
Redis through a TCP proxy that records what each connection sends: a new connection costs
no round trip the URL does not ask for, so one opens within a call's short timeout even
when Redis is a few milliseconds away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from rerank_service.redis_client import redis_client
from tests.support.redis_server import RedisServer

HANG = 10.0  # guards against a hang only


class RecordingProxy:
    """Loopback TCP in front of Redis's `port`, keeping what each client connection sent."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.sent: list[bytearray] = []  # per connection, in the order they opened
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, db: int = 0) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/{db}"

    async def __aenter__(self) -> RecordingProxy:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accepted(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        sent = bytearray()
        self.sent.append(sent)
        task = asyncio.get_running_loop().create_task(self._serve(sent, client_reader, client_writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, sent: bytearray, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self._port)
        try:
            await asyncio.gather(
                _pipe(client_reader, redis_writer, sent), _pipe(redis_reader, client_writer, None)
            )
        finally:
            for writer in (client_writer, redis_writer):
                writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: bytearray | None) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            if sent is not None:
                sent += data
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def proxy(redis_empty: RedisServer) -> AsyncIterator[RecordingProxy]:
    async with RecordingProxy(redis_empty.port) as started:
        yield started


async def test_a_new_connection_sends_nothing_before_the_first_command(proxy: RecordingProxy) -> None:
    """No HELLO, CLIENT SETNAME, CLIENT SETINFO or CLIENT MAINT_NOTIFICATIONS: each would be
    a round trip more, within the call's timeout, before the first answer of a connection."""
    client = redis_client(proxy.url(), timeout=HANG)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()

    assert [bytes(sent) for sent in proxy.sent] == [b"*1\r\n$4\r\nPING\r\n"]


async def test_a_database_in_the_url_is_the_one_thing_sent_first(proxy: RecordingProxy) -> None:
    client = redis_client(proxy.url(db=1), timeout=HANG)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()

    assert [bytes(sent) for sent in proxy.sent] == [b"*2\r\n$6\r\nSELECT\r\n$1\r\n1\r\n*1\r\n$4\r\nPING\r\n"]


async def test_replies_are_parsed_by_hiredis(redis_empty: RedisServer) -> None:
    """The install brings hiredis (a dependency) and the client reads Redis's replies with it:
    redis-py falls back to its Python parser without a word when hiredis is missing."""
    from redis._parsers import _AsyncHiredisParser

    client = redis_client(redis_empty.url)
    try:
        assert await client.ping()
        connection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            assert isinstance(connection._parser, _AsyncHiredisParser)
        finally:
            await client.connection_pool.release(connection)
    finally:
        await client.aclose()
