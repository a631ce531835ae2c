"""A raw HTTP/2 gRPC client (literal HPACK, no Huffman), for calls whose metadata grpc's own
client refuses to send (a control character in a value) but its server takes."""

from __future__ import annotations

import socket
import struct

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY = 0, 1, 3, 4, 7
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4


def _integer(value: int, prefix_bits: int) -> bytes:
    """An HPACK integer with a `prefix_bits`-bit prefix (RFC 7541 5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = [limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _header(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, neither string Huffman-coded."""
    return b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_status(target: str, method: str, metadata: list[tuple[bytes, bytes]], request: bytes) -> int | None:
    """The grpc-status of one unary call to `method` (`/package.Service/Method`) on a fresh
    connection to `target` (`host:port`), sending `metadata` as it is; None when the call ended
    without one (a reset stream, a closed connection)."""
    block = b"".join(
        _header(name, value)
        for name, value in [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", method.encode()),
            (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            *metadata,
        ]
    )  # fmt: skip
    message = b"\x00" + struct.pack(">I", len(request)) + request
    host, _, port = target.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(_SETTINGS, 0, 0, b""))
        sock.sendall(_frame(_HEADERS, _END_HEADERS, 1, block) + _frame(_DATA, _END_STREAM, 1, message))
        buffer = b""
        while chunk := sock.recv(65536):
            buffer += chunk
            while len(buffer) >= 9 and len(buffer) >= 9 + (length := int.from_bytes(buffer[:3], "big")):
                kind, flags, payload = buffer[3], buffer[4], buffer[9 : 9 + length]
                buffer = buffer[9 + length :]
                if kind == _SETTINGS and not flags & _ACK:
                    sock.sendall(_frame(_SETTINGS, _ACK, 0, b""))
                elif kind in (_RST_STREAM, _GOAWAY):
                    return None
                elif kind == _HEADERS and flags & _END_STREAM:
                    return _status_of(payload)
    return None


def _status_of(trailers: bytes) -> int | None:
    """grpc-status from a trailers block: grpc's server writes its name and value as plain
    literals (never Huffman-coded: a value of one or two digits would not be shorter)."""
    at = trailers.find(b"grpc-status")
    if at < 0:
        return None
    length = trailers[at + 11]
    assert not length & 0x80, "a Huffman-coded grpc-status"
    return int(trailers[at + 12 : at + 12 + length])
