"""A small HTTP forward proxy on loopback that counts what passes through it.

It forwards absolute-form requests (`POST http://host:port/path HTTP/1.1`: how a
client reaches a plain-http origin through a proxy) and opens CONNECT tunnels (how a
client reaches an https origin: TLS end to end, the proxy sees only bytes). Each
forwarded request goes to the origin on a fresh connection with `connection: close`,
and the origin's answer is relayed as it comes, so keep-alive towards the client works
without the proxy parsing any answer.

    with ForwardProxy() as proxy:
        ...  # point a client at proxy.url
        assert proxy.forwarded == [("POST", "http://127.0.0.1:8080/...")]
"""

from __future__ import annotations

import contextlib
import select
import socket
import socketserver
import sys
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_MAX_HEAD = 64 * 1024


@dataclass
class Passed:
    """One request the proxy handled: its method and target, and the headers it carried."""

    method: str
    target: str  # the absolute URL, or host:port for CONNECT
    headers: dict[str, str] = field(default_factory=dict)


class ForwardProxy:
    def __init__(self) -> None:
        self.passed: list[Passed] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(target=self._serve, name="test-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def forwarded(self) -> list[tuple[str, str]]:
        """(method, absolute URL) of each request forwarded in absolute form."""
        with self._lock:
            return [(p.method, p.target) for p in self.passed if p.method != "CONNECT"]

    @property
    def tunnels(self) -> list[str]:
        """host:port of each CONNECT tunnel opened."""
        with self._lock:
            return [p.target for p in self.passed if p.method == "CONNECT"]

    def _serve(self) -> None:
        self._server.serve_forever(poll_interval=0.05)  # a quick shutdown between tests

    def _record(self, passed: Passed) -> None:
        with self._lock:
            self.passed.append(passed)

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], handler: type[socketserver.BaseRequestHandler], proxy: ForwardProxy
    ) -> None:
        self.proxy = proxy
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # a side hung up: what tests provoke
            return
        super().handle_error(request, client_address)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        client: socket.socket = self.request
        buffered = b""
        while True:
            head, buffered = _read_head(client, buffered)
            if head is None:
                return
            method, target, headers = _parse_head(head)
            self.server.proxy._record(Passed(method, target, headers))
            if method == "CONNECT":
                self._tunnel(client, target, buffered)
                return
            length = int(headers.get("content-length", "0"))
            while len(buffered) < length:
                more = client.recv(65536)
                if not more:
                    return
                buffered += more
            body, buffered = buffered[:length], buffered[length:]
            if not self._forward(client, method, target, headers, body):
                return

    def _tunnel(self, client: socket.socket, target: str, early: bytes) -> None:
        host, _, port = target.rpartition(":")
        try:
            origin = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            return
        origin.settimeout(None)  # an origin may take its time to answer
        with origin:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if early:
                origin.sendall(early)
            _relay(client, origin)

    def _forward(
        self, client: socket.socket, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> bool:
        """Send one request on to its origin and relay the answer; False when the client
        should be hung up on (the origin could not be reached)."""
        url = urlsplit(target)
        path = url.path + (f"?{url.query}" if url.query else "")
        try:
            origin = socket.create_connection((url.hostname or "", url.port or 80), timeout=5)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            return False
        origin.settimeout(None)  # an origin may take its time to answer
        kept = {k: v for k, v in headers.items() if not k.startswith("proxy-") and k != "connection"}
        lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in kept.items()), "connection: close"]
        with origin:
            origin.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
            # The origin closes after its answer (connection: close), which ends it here;
            # the client reads the answer's own framing, and may send the next request.
            while data := origin.recv(65536):
                client.sendall(data)
        return True


def _read_head(sock: socket.socket, buffered: bytes) -> tuple[bytes | None, bytes]:
    while b"\r\n\r\n" not in buffered:
        if len(buffered) > _MAX_HEAD:
            return None, b""
        try:
            more = sock.recv(65536)
        except OSError:
            return None, b""
        if not more:
            return None, b""
        buffered += more
    head, _, rest = buffered.partition(b"\r\n\r\n")
    return head, rest


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Bytes both ways until either side closes."""
    peers = {a: b, b: a}
    while True:
        readable, _, _ = select.select(list(peers), [], [], 30)
        if not readable:
            return
        for sock in readable:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    peers[sock].shutdown(socket.SHUT_WR)
                return
            peers[sock].sendall(data)
