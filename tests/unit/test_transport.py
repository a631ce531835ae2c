"""The upstream transport's pool and its cheap connection-liveness probe."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpcore
import pytest

from rerank_service.backends.upstream.network import ProbedBackend, _ProbedStream
from rerank_service.backends.upstream.pool import LeanConnectionPool
from rerank_service.backends.upstream.transport import pooled_transport


class SocketOnly(httpcore.AsyncNetworkStream):
    """An inner stream that only knows its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, info: str) -> Any:
        return self.sock if info == "socket" else None


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_the_transport_pools_connections_through_the_probed_backend() -> None:
    transport = pooled_transport(max_connections=7)

    pool: object = transport._pool  # httpx annotates it as httpcore's own pool
    assert isinstance(pool, LeanConnectionPool)
    assert isinstance(pool._network_backend, ProbedBackend)
    assert pool._slots._value == 7


def test_an_idle_open_connection_is_not_readable(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair

    assert _ProbedStream(SocketOnly(ours)).get_extra_info("is_readable") is False


def test_a_connection_the_server_closed_is_readable(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.close()

    assert _ProbedStream(SocketOnly(ours)).get_extra_info("is_readable") is True


def test_unasked_for_bytes_make_a_connection_readable(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")

    assert _ProbedStream(SocketOnly(ours)).get_extra_info("is_readable") is True


def test_the_raw_socket_is_kept(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair

    assert _ProbedStream(SocketOnly(ours)).get_extra_info("socket") is ours
