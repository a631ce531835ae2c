"""One HTTP exchange with the upstream: the request, sending it, and its bounded body."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from rerank_service.backends.upstream.client.body import content_coding, read_body
from rerank_service.config.secret import Secret


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    status: int
    headers: httpx.Headers
    content: bytes  # decoded (gzip undone)


# Normalised once: each call copies the list instead of normalising every header again.
_FIXED_HEADERS = httpx.Headers(
    {
        "content-type": "application/json",
        "accept": "application/json",
        # gzip is asked for: a 500-document answer is tens of KiB of JSON that gzip cuts
        # about fourfold, which over a WAN saves round trips of TCP slow start (each worth
        # far more than the tens of microseconds inflating costs). Without this header
        # an upstream may send any coding (RFC 9110 12.5.3), so naming one also pins it.
        "accept-encoding": "gzip",
        "user-agent": "rerank-service",
    }
)


def call_headers(token: Secret | None, traceparent: str | None, tracestate: str | None) -> httpx.Headers:
    """The headers of one call: the bearer key only when there is one, W3C trace context
    when the caller sent it (tracestate means nothing without traceparent)."""
    headers = httpx.Headers(_FIXED_HEADERS)
    if token is not None:
        headers["authorization"] = f"Bearer {token.reveal()}"
    if traceparent is not None:
        headers["traceparent"] = traceparent
        if tracestate is not None:
            headers["tracestate"] = tracestate
    return headers


def build_request(url: httpx.URL, content: bytes, headers: httpx.Headers, seconds: float) -> httpx.Request:
    """A JSON POST whose every phase (pool wait, connect, each write and read) fits in `seconds`."""
    return httpx.Request(
        "POST",
        url,
        content=content,
        headers=headers,
        extensions={"timeout": {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}},
    )


async def exchange(transport: httpx.AsyncBaseTransport, request: httpx.Request) -> UpstreamReply:
    """Send `request`; the status, headers and whole decoded body (body.py bounds its size)."""
    response = await transport.handle_async_request(request)
    try:
        # httpx's transport hands over the body as it came off the wire: body.py decodes it.
        # An async transport's body is async (httpx types it as either).
        content = await read_body(response.stream, content_coding(response.headers.raw))  # type: ignore[arg-type]
    finally:
        await response.aclose()
    return UpstreamReply(response.status_code, response.headers, content)
