"""The process's one httpx client: pooling, timeouts and the caller's deadline.

Every upstream call goes through `UpstreamTransport.post_json`, so the rules for
time (never outlive the caller's deadline) and size (never buffer an unbounded
body) live in one place, and so does measuring it: each HTTP attempt is counted by
outcome and timed (metrics.py), and its time is added to the call's record.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from rerank_service.backends.upstream import errors
from rerank_service.backends.upstream.http.network import AsyncioBackend
from rerank_service.backends.upstream.http.pool import LeanConnectionPool
from rerank_service.config.secret import Secret
from rerank_service.core.domain import ServiceError
from rerank_service.observability import metrics

# A rerank response is a few bytes per document; anything near this is broken.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    status: int
    headers: httpx.Headers
    content: bytes


_FIXED_HEADERS = {
    "content-type": "application/json",
    "accept": "application/json",
    "user-agent": "rerank-service",
}


def pooled_transport(max_connections: int) -> httpx.AsyncHTTPTransport:
    """httpx's transport on a pool that costs O(1) a call, with a cheap liveness probe."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    # httpx takes no pool or network backend, so the pool it built is swapped for ours
    # (pool.py says why); tests/unit/test_transport.py fails if httpx renames the attribute.
    # httpx annotates the attribute as httpcore's pool; it only calls the interface both speak.
    transport._pool = LeanConnectionPool(  # type: ignore[assignment]
        max_connections=max_connections,
        keepalive_expiry=30.0,
        ssl_context=httpx.create_ssl_context(trust_env=False),
        network_backend=AsyncioBackend(),
    )
    return transport


class UpstreamTransport:
    def __init__(
        self,
        base_url: str,
        timeout: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeout = timeout
        self._base_url = base_url.rstrip("/")
        # httpx's transport, driven directly: the client layer above it (URL merging,
        # auth, redirects, cookies, event hooks) is per-call work this service never uses.
        self._transport = transport or pooled_transport(max_connections)
        self._urls: dict[str, httpx.URL] = {}

    async def close(self) -> None:
        await self._transport.aclose()

    async def post_json(
        self,
        path: str,
        body: dict[str, Any],
        token: Secret | None,
        deadline: float | None,
        *,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> UpstreamReply:
        """POST `body` as JSON; bounded by the upstream timeout and the caller's deadline.

        `traceparent`/`tracestate` (already validated) go along as W3C trace headers.
        """
        budget, cut_by_caller = self._budget(deadline)
        if budget <= 0:
            raise errors.timed_out(by_caller_deadline=True)
        headers = {"authorization": f"Bearer {token.reveal()}"} if token is not None else {}
        if traceparent is not None:
            headers["traceparent"] = traceparent
            if tracestate is not None:
                headers["tracestate"] = tracestate
        content = orjson.dumps(body)
        call = metrics.active_call()
        started = time.perf_counter()
        if call is not None:
            call.upstream_began(started)
        outcome: int | str = "cancelled"
        try:
            # httpx timeouts apply per phase (connect, each read); asyncio.timeout
            # bounds the whole exchange, so a trickling body cannot outlive it.
            async with asyncio.timeout(budget):
                reply = await self._send(path, content, headers, budget)
            outcome = reply.status
            return reply
        except TimeoutError:
            outcome = "timeout"
            raise errors.timed_out(cut_by_caller) from None
        except httpx.HTTPError as exc:
            outcome = transport_failure(exc)
            raise errors.from_transport(exc, cut_by_caller) from None
        except ServiceError:
            outcome = "too_large"  # the only ServiceError _send raises
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            ended = time.perf_counter()
            if call is not None:
                call.upstream_ended(ended)
            metrics.observe_upstream(outcome, ended - started)

    def _budget(self, deadline: float | None) -> tuple[float, bool]:
        if deadline is None:
            return self._timeout, False
        remaining = deadline - time.monotonic()
        return (remaining, True) if remaining < self._timeout else (self._timeout, False)

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._base_url + path)
        return url

    async def _send(self, path: str, content: bytes, headers: dict[str, str], budget: float) -> UpstreamReply:
        headers.update(_FIXED_HEADERS)
        request = httpx.Request(
            "POST",
            self._url(path),
            content=content,
            headers=headers,
            extensions={"timeout": {"connect": budget, "read": budget, "write": budget, "pool": budget}},
        )
        response = await self._transport.handle_async_request(request)
        try:
            chunks: list[bytes] = []
            size = 0
            # No accept-encoding is sent, so the body arrives as it is: nothing to decode.
            async for chunk in response.stream:  # type: ignore[union-attr]  # always async here
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise errors.too_large(MAX_RESPONSE_BYTES)
                chunks.append(chunk)
        finally:
            await response.aclose()
        return UpstreamReply(response.status_code, response.headers, b"".join(chunks))


def transport_failure(exc: httpx.HTTPError) -> str:
    """The metrics label of an attempt that got no HTTP status."""
    if isinstance(exc, httpx.PoolTimeout):
        return "pool_timeout"  # our own connection pool was full: the upstream never saw it
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return "reset"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol_error"  # includes a connection closed before any answer
    return "transport_error"
