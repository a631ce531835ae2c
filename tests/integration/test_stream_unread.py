"""A RerankStream whose client sends items and never reads their answers: a raw HTTP/2 client
that advertises a receive window of 0 and never opens it, so every answer's write waits on
flow control."""

from __future__ import annotations

import socket
import struct

import grpc
from rerank.v1 import rerank_pb2

from tests.conftest import ServerFactory
from tests.support.logs import LogCapture
from tests.support.raw_h2 import _DATA, _END_HEADERS, _HEADERS, _SETTINGS, _frame, _header
from tests.support.rpc import request
from tests.support.waiting import wait_until

RERANK_STREAM = b"/rerank.v1.RerankService/RerankStream"
_WINDOW_UPDATE = 8
_INITIAL_WINDOW_SIZE = 4  # the SETTINGS parameter


def _unread_stream(target: str) -> socket.socket:
    """A connection with a receive window of 0 that opens a RerankStream, sends one item and
    neither half-closes nor reads. (A connection each: a fresh HPACK table, so the trailers'
    grpc-status comes as a literal, readable without a decoder.)"""
    host, _, port = target.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    block = b"".join(
        _header(name, value)
        for name, value in [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", RERANK_STREAM),
            (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        ]
    )  # fmt: skip
    item = rerank_pb2.RerankStreamRequest(id="unread", request=request()).SerializeToString()
    sock.sendall(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + _frame(_SETTINGS, 0, 0, struct.pack(">HI", _INITIAL_WINDOW_SIZE, 0))
        + _frame(_HEADERS, _END_HEADERS, 1, block)
        + _frame(_DATA, 0, 1, b"\x00" + struct.pack(">I", len(item)) + item)
    )
    return sock


def _status_once_read(sock: socket.socket) -> int | None:
    """Open the stream's window, then read on to its trailers: their grpc-status."""
    window = struct.pack(">I", 1 << 20)
    sock.sendall(
        _frame(_SETTINGS, 0, 0, struct.pack(">HI", _INITIAL_WINDOW_SIZE, 1 << 20))
        + _frame(_WINDOW_UPDATE, 0, 0, window)
        + _frame(_WINDOW_UPDATE, 0, 1, window)
    )
    buffer = b""
    while chunk := sock.recv(65536):
        buffer += chunk
        while len(buffer) >= 9 and len(buffer) >= 9 + (length := int.from_bytes(buffer[:3], "big")):
            kind, flags, payload = buffer[3], buffer[4], buffer[9 : 9 + length]
            buffer = buffer[9 + length :]
            if kind == _HEADERS and flags & 0x1:  # END_STREAM: the trailers
                # The name as a literal of 11 bytes (not grpc-status-details-bin), then its value.
                at = payload.find(b"\x0bgrpc-status") + 12
                return int(payload[at + 1 : at + 1 + payload[at]]) if at >= 12 else None
    return None


def test_a_stream_whose_client_does_not_read_ends_after_the_idle_timeout_holding_nothing(
    serve: ServerFactory, logs: LogCapture
) -> None:
    """Its slots and bytes were given back only once an answer was written, and the write
    waited on flow control without a bound: two such streams held both slots of
    --max-concurrent-requests 2 until their connection closed, every other caller refused
    OVERLOADED. Now an answer not taken within --stream-idle-timeout ends the stream."""
    with serve(stream_idle_timeout=1.0, max_concurrent_requests=2) as server:
        assert server.server is not None
        admission = server.server.admission
        with _unread_stream(server.target) as first, _unread_stream(server.target) as second:
            wait_until(lambda: admission.in_flight == 2, what="both streams' items holding a slot")
            wait_until(
                lambda: admission.open == 0 and admission.in_flight == 0 and admission.bytes_in_flight == 0,
                what="the unread streams ended, their slots and bytes given back",
            )
            answer = server.stub.Rerank(request(), timeout=10)  # another caller gets a slot
            # Their status waits behind the answer their client never took, and comes after it.
            statuses = [_status_once_read(first), _status_once_read(second)]

    assert len(answer.output.results) == len(request().documents)
    assert statuses == [grpc.StatusCode.DEADLINE_EXCEEDED.value[0]] * 2
    streams = [event for event in logs.events() if event["event"] == "stream"]
    assert [event["code"] for event in streams] == ["DEADLINE_EXCEEDED"] * 2
    assert all("does not read" in event["details"] for event in streams)
