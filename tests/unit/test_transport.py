"""The upstream transport's pool and its asyncio network layer, on real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpcore
import pytest

from rerank_service.backends.upstream.http.network import AsyncioBackend
from rerank_service.backends.upstream.http.pool import LeanConnectionPool
from rerank_service.backends.upstream.http.transport import pooled_transport


def test_the_transport_pools_connections_through_the_asyncio_backend() -> None:
    transport = pooled_transport(max_connections=7)

    pool: object = transport._pool  # httpx annotates it as httpcore's own pool
    assert isinstance(pool, LeanConnectionPool)
    assert isinstance(pool._network_backend, AsyncioBackend)
    assert pool._slots._value == 7


class Peer:
    """The far end of one connection: a loopback server that accepts once."""

    def __init__(self) -> None:
        self.accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

    async def start(self) -> int:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted.set_result((reader, writer))

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port


Connected = tuple[httpcore.AsyncNetworkStream, asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def connected() -> AsyncIterator[Connected]:
    peer = Peer()
    port = await peer.start()
    stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2)
    reader, writer = await peer.accepted
    yield stream, reader, writer
    await stream.aclose()
    writer.close()
    peer.server.close()


async def test_bytes_go_both_ways(connected: Connected) -> None:
    stream, reader, writer = connected

    await stream.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.write(b"pong")
    assert await stream.read(100, timeout=2) == b"pong"


async def test_an_idle_open_connection_is_not_readable(connected: Connected) -> None:
    stream, _, _ = connected
    await asyncio.sleep(0.05)

    assert stream.get_extra_info("is_readable") is False


async def test_a_connection_the_server_closed_is_readable_and_reads_empty(connected: Connected) -> None:
    stream, _, writer = connected
    writer.close()
    await asyncio.sleep(0.05)

    assert stream.get_extra_info("is_readable") is True
    assert await stream.read(100, timeout=2) == b""


async def test_unasked_for_bytes_make_a_connection_readable(connected: Connected) -> None:
    stream, _, writer = connected
    writer.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    await asyncio.sleep(0.05)

    assert stream.get_extra_info("is_readable") is True


async def test_a_read_with_nothing_coming_times_out_as_httpcore_expects(connected: Connected) -> None:
    stream, _, _ = connected

    with pytest.raises(httpcore.ReadTimeout):
        await stream.read(100, timeout=0.05)


async def test_a_large_answer_arrives_whole_through_the_buffer_bound(connected: Connected) -> None:
    stream, _, writer = connected
    payload = bytes(range(256)) * 8192  # 2 MiB: past the buffer's high-water mark
    writer.write(payload)
    await writer.drain()
    writer.close()

    received = bytearray()
    while chunk := await stream.read(65536, timeout=2):
        received += chunk
    assert bytes(received) == payload


async def test_connecting_where_nothing_listens_is_a_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(httpcore.ConnectError):
        await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2)


async def test_the_stream_names_its_socket_and_addresses(connected: Connected) -> None:
    stream, _, _ = connected

    assert stream.get_extra_info("server_addr")[0] == "127.0.0.1"
    assert stream.get_extra_info("client_addr")[0] == "127.0.0.1"
    assert stream.get_extra_info("socket") is not None
    assert stream.get_extra_info("ssl_object") is None
