"""The process's one upstream transport: every upstream call goes through `post_json`.

So the rules for time (never outlive the caller's deadline: budget.py), size (never
buffer an unbounded body, gzip bombs included: body.py), failures (errors the caller
understands: failures.py) and measurement (each attempt counted and timed: attempt.py)
live in one place. Which connections carry the calls (direct, or through a proxy) and
which certificates are trusted is settled once, at construction (connections.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson

from rerank_service.backends.upstream import errors
from rerank_service.backends.upstream.client.attempt import AttemptMetric
from rerank_service.backends.upstream.client.body import MAX_RESPONSE_BYTES
from rerank_service.backends.upstream.client.budget import attempt_budget
from rerank_service.backends.upstream.client.connections import open_transport, pooled_transport
from rerank_service.backends.upstream.client.exchange import (
    UpstreamReply,
    build_request,
    call_headers,
    exchange,
)
from rerank_service.backends.upstream.client.failures import classify, transport_failure
from rerank_service.config.secret import Secret
from rerank_service.observability.metrics import Metrics

__all__ = [
    "MAX_RESPONSE_BYTES",
    "UpstreamReply",
    "UpstreamTransport",
    "pooled_transport",
    "transport_failure",
]


class UpstreamTransport:
    def __init__(
        self,
        base_url: str,
        timeout: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        proxy: str | None = None,
        ca_file: Path | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`proxy`: every call goes through this HTTP proxy (None: HTTPS_PROXY and the rest
        of the environment decide). `ca_file`: trust this PEM bundle for the upstream's
        certificate (None: SSL_CERT_FILE / SSL_CERT_DIR, else certifi). ConfigError if
        either is unusable. `transport` (tests): use it instead, ignoring both. `metrics`:
        where each attempt is counted (None: a Metrics of its own, served nowhere: tests)."""
        self._metrics = metrics if metrics is not None else Metrics()
        self._timeout = timeout
        self._base_url = base_url.rstrip("/")
        # httpx's transport, driven directly: the client layer above it (URL merging,
        # auth, redirects, cookies, event hooks) is per-call work this service never uses.
        self._transport = transport or open_transport(
            httpx.URL(self._base_url), max_connections, proxy=proxy, ca_file=ca_file
        )
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
        Any answer with a status is returned; a failure without one raises ServiceError.
        """
        seconds, by_caller = attempt_budget(self._timeout, deadline)
        if seconds <= 0:
            raise errors.timed_out(by_caller_deadline=True)
        headers = call_headers(token, traceparent, tracestate)
        request = build_request(self._url(path), orjson.dumps(body), headers, seconds)
        with AttemptMetric(self._metrics) as attempt:
            try:
                # httpx timeouts apply per phase (connect, each read); asyncio.timeout
                # bounds the whole exchange, so a trickling body cannot outlive it.
                async with asyncio.timeout(seconds):
                    reply = await exchange(self._transport, request)
            except Exception as exc:
                failure = classify(exc, by_caller)
                attempt.outcome = failure.label
                if failure.error is None:
                    raise
                raise failure.error from None
            attempt.outcome = reply.status
            return reply

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._base_url + path)
        return url
