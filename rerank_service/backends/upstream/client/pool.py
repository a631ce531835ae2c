# WHEN THIS CAN GO: once httpcore's own AsyncConnectionPool costs O(1) per request and
# probes idle connections cheaply. httpcore's pool already takes a network backend (so
# network.py could ride on it), but httpx's transport takes neither a pool nor a backend:
# connections.py swaps `transport._pool`; a public hook on httpx's AsyncHTTPTransport
# (a pool or network_backend argument) would end that too.
# Upstream: encode/httpx#3215 (AsyncClient far slower than aiohttp under concurrency);
# encode/httpcore#1035 (O(N+M) request assignment, open); encode/httpcore#924, split into
# #928 (the is_readable socket polling fix) and #929 (the pool's loops, closed wontfix).
# Until then httpcore is pinned to a minor version (pyproject.toml) and
# tests/unit/test_httpcore_private_api.py checks every private piece used here.
"""A connection pool for one upstream origin whose every step costs O(1).

httpcore's own pool re-examines every connection for every queued request each time a
request starts or a response closes (and, for each idle connection, counts all the
idle ones again): with 64 calls in flight that was thousands of method calls, about a
millisecond of CPU, per upstream call, the largest cost of the service's hot path.
This pool keeps idle connections on a stack and bounds the connections in use with a
semaphore: taking and returning one is a pop and a push.

It speaks httpcore's request interface, so httpx's transport drives it as it drives
its own pool, and its connections are httpcore's HTTP/1.1 connections (same protocol
code, same timeouts), opened by the pool itself on the asyncio network layer.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

import httpcore
from httpcore._async.http11 import AsyncHTTP11Connection
from httpcore._async.interfaces import AsyncRequestInterface


class LeanConnectionPool(AsyncRequestInterface):
    def __init__(
        self,
        max_connections: int,
        keepalive_expiry: float,
        ssl_context: ssl.SSLContext | None,
        network_backend: httpcore.AsyncNetworkBackend,
    ) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._network_backend = network_backend
        # Most recently used last: reuse the warmest connection, let the rest expire.
        self._idle: list[AsyncHTTP11Connection] = []
        self._in_use: set[AsyncHTTP11Connection] = set()
        self._closed = False

    @property
    def connections(self) -> int:
        """Open connections, idle or in use."""
        return len(self._idle) + len(self._in_use)

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._closed:
            raise RuntimeError("the upstream connection pool is closed")
        await self._take_slot(request.extensions.get("timeout", {}).get("pool"))
        try:
            connection = await self._idle_connection(request.url.origin) or await self._connect(request)
        except BaseException:
            self._slots.release()
            raise
        self._in_use.add(connection)
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            await self._release(connection)
            raise
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=_ReleasingStream(_body(response), lambda: self._release(connection)),
            extensions=response.extensions,
        )

    async def _take_slot(self, wait_at_most: float | None) -> None:
        try:
            async with asyncio.timeout(wait_at_most):
                await self._slots.acquire()
        except TimeoutError:
            raise httpcore.PoolTimeout("no upstream connection became free in time") from None

    async def _idle_connection(self, origin: httpcore.Origin) -> AsyncHTTP11Connection | None:
        while self._idle:
            connection = self._idle.pop()
            # has_expired: past keep-alive, or the server closed it (a readable idle socket).
            reusable = connection.is_idle() and not connection.has_expired()
            if reusable and connection.can_handle_request(origin):
                return connection
            await connection.aclose()
        return None

    async def _connect(self, request: httpcore.Request) -> AsyncHTTP11Connection:
        """A new HTTP/1.1 connection (TLS for https), within the request's connect timeout."""
        origin = request.url.origin
        timeout = request.extensions.get("timeout", {}).get("connect")
        host = origin.host.decode("ascii")
        stream = await self._network_backend.connect_tcp(host, origin.port, timeout=timeout)
        if origin.scheme == b"https":
            context = self._ssl_context or ssl.create_default_context()
            server_hostname = request.extensions.get("sni_hostname") or host
            stream = await stream.start_tls(context, server_hostname=server_hostname, timeout=timeout)
        connection = AsyncHTTP11Connection(origin, stream, keepalive_expiry=self._keepalive_expiry)
        # httpcore's own lock is anyio's, whose every acquire costs an extra turn of the
        # event loop; this pool only ever runs on asyncio, where asyncio's lock is exact.
        connection._state_lock = asyncio.Lock()  # type: ignore[assignment]
        return connection

    async def _release(self, connection: AsyncHTTP11Connection) -> None:
        if connection not in self._in_use:
            return  # already released (a stream closed twice)
        self._in_use.discard(connection)
        try:
            if connection.is_idle() and not self._closed:
                self._idle.append(connection)
            else:  # a response not read to its end, or a broken connection: not reusable
                await connection.aclose()
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        self._closed = True
        connections = self._idle + list(self._in_use)
        self._idle.clear()
        for connection in connections:
            await connection.aclose()

    async def __aenter__(self) -> LeanConnectionPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _body(response: httpcore.Response) -> AsyncIterable[bytes]:
    assert isinstance(response.stream, AsyncIterable)  # an async pool gets async streams
    return response.stream


class _ReleasingStream:
    """A response body that gives its connection back to the pool when closed."""

    def __init__(self, stream: AsyncIterable[bytes], release: Callable[[], Awaitable[None]]) -> None:
        self._stream = stream
        self._release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            close = getattr(self._stream, "aclose", None)
            if close is not None:
                await close()
        finally:
            await self._release()
