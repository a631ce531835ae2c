"""One HTTP exchange with the upstream: the request, sending it, and its bounded body."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from rerank_service.backends.upstream.client.body import (
    ResponseTooLarge,
    UndecodableBody,
    content_coding,
    read_body,
)
from rerank_service.backends.upstream.client.connections import (
    HANDED_OUT,
    PHASE,
    CountingHandler,
    Phase,
    Route,
)
from rerank_service.config.secret import Secret


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    status: int
    headers: Mapping[str, str]  # case-insensitive names (aiohttp's CIMultiDictProxy)
    content: bytes  # decoded (gzip undone)


# Copied for each call: aiohttp sends them as given (it adds Host and Content-Length).
_FIXED_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json",
    # gzip is asked for: a 500-document answer is tens of KiB of JSON that gzip cuts
    # about fourfold, which over a WAN saves round trips of TCP slow start (each worth
    # far more than the tens of microseconds inflating costs). Without this header
    # an upstream may send any coding (RFC 9110 12.5.3), so naming one also pins it.
    "Accept-Encoding": "gzip",
    "User-Agent": "rerank-service",
}


def call_headers(token: Secret | None, traceparent: str | None, tracestate: str | None) -> dict[str, str]:
    """The headers of one call: the bearer key only when there is one, W3C trace context
    when the caller sent it (tracestate means nothing without traceparent)."""
    headers = _FIXED_HEADERS.copy()
    if token is not None:
        headers["Authorization"] = f"Bearer {token.reveal()}"
    if traceparent is not None:
        headers["traceparent"] = traceparent
        if tracestate is not None:
            headers["tracestate"] = tracestate
    return headers


async def exchange(
    session: aiohttp.ClientSession,
    route: Route,
    url: URL,
    content: bytes,
    headers: dict[str, str],
    limit: int,
) -> UpstreamReply:
    """POST `content`; the status, headers and whole decoded body (at most `limit` bytes decoded)."""
    if route.forward_headers is not None:
        headers.update(route.forward_headers)
    response = await _send(session, route, url, content, headers)
    async with response:  # gives the connection back to the pool, or closes it if unread
        status = response.status
        if _never_has_a_body(status):
            # Whatever its Content-Length says (a 304 may give the length of the body it
            # stands for): the parser reads none, so none is waited for (RFC 9112 6.3).
            return UpstreamReply(status, response.headers, b"")
        try:
            body = await _body(response, limit)
        except (ResponseTooLarge, UndecodableBody, *_CUT_SHORT):
            if 200 <= status < 300:
                raise
            # A failure's status says what happened (a 503 is worth a retry) whatever its
            # body: one too large, broken or cut short only loses the upstream's message.
            body = b""
        return UpstreamReply(status, response.headers, body)


async def _body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The response's whole body, decoded: ResponseTooLarge past `limit`, UndecodableBody
    if it is not what its headers say."""
    coding = content_coding(response.raw_headers)
    length = response.content_length
    if coding is None and length is not None:
        # The common case: a plain body of announced length, read in one go.
        if length > limit:
            raise ResponseTooLarge(limit)
        return await response.content.readexactly(length) if length else b""
    # Chunked, or gzip: read piece by piece so the bound holds while it arrives.
    return await read_body(response.content.iter_any(), coding, limit)


# What reading a body the connection cut short raises: readexactly's IncompleteReadError,
# aiohttp's payload errors (a Content-Length or chunk not filled) or connection errors (a
# reset). A timeout is none of these: it is the attempt's budget, not the body's fault.
_CUT_SHORT = (asyncio.IncompleteReadError, aiohttp.ClientError)


def _never_has_a_body(status: int) -> bool:
    """1xx, 204 and 304 answers end with their headers (RFC 9110 6.4.1)."""
    return status < 200 or status in (204, 304)


async def _send(
    session: aiohttp.ClientSession, route: Route, url: URL, content: bytes, headers: dict[str, str]
) -> aiohttp.ClientResponse:
    """The request sent and the answer's head read. An idle connection the upstream closed
    just as it was taken (its close still on the way: keep-alive timeouts cross like this)
    fails at once without a byte of an answer, closed or reset (_closed_unanswered): then
    the request is sent once more (the pool has dropped that connection). A fresh
    connection that fails so is the upstream's failure, not resent here (the retry policy
    decides), and neither is a second failure, a close after part of an answer (the
    upstream had the request), nor a close that came too late to have been on its way
    already (_STALE_CLOSE_WINDOW).

    A redirect is never followed: that would send the caller's query and documents
    wherever its Location says (another host, plain http), or turn the POST into a GET.
    The 3xx comes back as it is, an unexpected status (errors.py)."""
    HANDED_OUT.set(None)
    PHASE.set(Phase.EXCHANGE)
    try:
        return await _post(session, route, url, content, headers)
    except aiohttp.ClientConnectionError as exc:
        connection = HANDED_OUT.get()  # the kept-alive connection it was sent on (None: a new one)
        if (
            connection is None
            or session.closed  # cut off by our own close: nothing to resend on (RuntimeError)
            # Timed from when the pool handed the connection out, not from before a wait for it.
            or time.monotonic() - connection.handed_out_at > _STALE_CLOSE_WINDOW
            or not _closed_unanswered(exc, connection)
        ):
            raise
    HANDED_OUT.set(None)
    return await _post(session, route, url, content, headers)


def _closed_unanswered(exc: aiohttp.ClientConnectionError, connection: CountingHandler) -> bool:
    """Whether `exc` is the connection ending with no byte of an answer received on it
    (`connection`: its protocol, which counts them): closed (FIN), or reset
    or broken as the request went out or waited. An upstream that closes an idle
    connection holding a request it has not read sends a reset, not a close (the kernel's
    answer to unread bytes): that is the common form of the idle-close race."""
    if connection.received:
        # An answer begun, however little of it, proves the upstream had the request. The
        # count, not the error, says so: aiohttp reports a reset after part of an answer
        # as it does one before any (ECONNRESET).
        return False
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientConnectionResetError):
        return True  # closed; or written to a transport already closing
    # Reset: only a connection idle long enough for an upstream's idle timer to have closed
    # it. One reused at once and reset as the request came is the upstream's doing with the
    # request (it read it, then dropped the connection): the retry policy's, counted.
    return (
        isinstance(exc, aiohttp.ClientOSError)
        and exc.errno in (errno.ECONNRESET, errno.EPIPE)
        and connection.idle_for >= _RESET_RACE_IDLE
    )


# Seconds after its connection was handed out within which a kept-alive connection closed
# (or reset) without an answer is taken for one the upstream closed while idle, before the
# request reached it (the wait for a free connection not counted: it may be long). A close
# already on its way when the request went out arrives within about a round trip; one
# that comes later is most likely the upstream's own doing with the request (it worked
# on it, then its worker died): resent at once and uncounted, one call would reach it
# more times than --upstream-max-attempts. That failure is left to the retry policy,
# which counts it; so is the rare stale close slower than this (a far upstream).
_STALE_CLOSE_WINDOW = 0.25
# Seconds a connection must have sat idle before its reset is taken for the idle-close race:
# no upstream's idle timeout is shorter (uvicorn's and Node's 5 s are the shortest in use).
_RESET_RACE_IDLE = 1.0


def _post(
    session: aiohttp.ClientSession, route: Route, url: URL, content: bytes, headers: dict[str, str]
) -> Awaitable[aiohttp.ClientResponse]:
    return session.post(
        url,
        data=content,
        headers=headers,
        proxy=route.proxy,
        proxy_headers=route.proxy_headers,
        allow_redirects=False,
    )
