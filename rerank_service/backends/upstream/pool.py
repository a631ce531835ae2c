"""A connection pool for one upstream origin whose every step costs O(1).

httpcore's own pool re-examines every connection for every queued request each time a
request starts or a response closes (and, for each idle connection, counts all the
idle ones again): with 64 calls in flight that was thousands of method calls, about a
millisecond of CPU, per upstream call, the largest cost of the service's hot path.
This pool keeps idle connections on a stack and bounds the connections in use with a
semaphore: taking and returning one is a pop and a push.

It speaks httpcore's request interface, so httpx's transport drives it as it drives
its own pool (same connections, same HTTP/1.1 code, same timeouts).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

import httpcore
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
        self._network_backend = network_backend
        # Most recently used last: reuse the warmest connection, let the rest expire.
        self._idle: list[httpcore.AsyncHTTPConnection] = []
        self._in_use: set[httpcore.AsyncHTTPConnection] = set()
        self._closed = False

    @property
    def connections(self) -> int:
        """Open connections, idle or in use."""
        return len(self._idle) + len(self._in_use)

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        pool_timeout = request.extensions.get("timeout", {}).get("pool")
        connection = await self._acquire(request.url.origin, wait_at_most=pool_timeout)
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

    async def _acquire(
        self, origin: httpcore.Origin, wait_at_most: float | None
    ) -> httpcore.AsyncHTTPConnection:
        if self._closed:
            raise RuntimeError("the upstream connection pool is closed")
        try:
            async with asyncio.timeout(wait_at_most):
                await self._slots.acquire()
        except TimeoutError:
            raise httpcore.PoolTimeout("no upstream connection became free in time") from None
        while self._idle:
            connection = self._idle.pop()
            # has_expired: past keep-alive, or the server closed it (a readable idle socket).
            if (
                connection.is_idle()
                and not connection.has_expired()
                and connection.can_handle_request(origin)
            ):
                self._in_use.add(connection)
                return connection
            await connection.aclose()
        connection = httpcore.AsyncHTTPConnection(
            origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            network_backend=self._network_backend,
        )
        self._in_use.add(connection)
        return connection

    async def _release(self, connection: httpcore.AsyncHTTPConnection) -> None:
        if connection not in self._in_use:
            return  # already released (a stream closed twice)
        self._in_use.discard(connection)
        try:
            if connection.is_idle() and not connection.is_closed() and not self._closed:
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
