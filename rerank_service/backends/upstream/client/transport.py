"""The process's one upstream transport: every upstream call goes through `post_json`.

So the rules for time (never outlive the caller's deadline: budget.py), size (never
buffer an unbounded body, gzip bombs included: body.py), failures (errors the caller
understands: failures.py) and measurement (each attempt counted and timed: attempt.py)
live in one place. The calls ride on aiohttp's client: its connection pool and C parser
(connections.py says how the pool is set up); which route they take (direct, or through
a proxy) and which certificates are trusted is settled once, at construction.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from yarl import URL

from rerank_service.backends.upstream import errors
from rerank_service.backends.upstream.client.attempt import AttemptMetric
from rerank_service.backends.upstream.client.body import MAX_RESPONSE_BYTES
from rerank_service.backends.upstream.client.budget import ATTEMPT, MIN_EXCHANGE, AttemptBudget, Bound
from rerank_service.backends.upstream.client.connections import (
    KEEPALIVE_EXPIRY,
    PHASE,
    Phase,
    open_session,
    route_to,
)
from rerank_service.backends.upstream.client.exchange import UpstreamReply, call_headers, exchange
from rerank_service.backends.upstream.client.failures import classify, transport_failure
from rerank_service.backends.upstream.client.tls import upstream_ssl_context
from rerank_service.config.secret import Secret
from rerank_service.core.domain import not_ready
from rerank_service.observability.metrics import Metrics

__all__ = [
    "MAX_RESPONSE_BYTES",
    "UpstreamReply",
    "UpstreamTransport",
    "cut_while_unreachable",
    "transport_failure",
]

# Set in the calling task as an attempt ends: whether it was cancelled (its caller gone,
# grpc ending it at its deadline) while its TCP connect had gone unanswered for
# budget.UNANSWERED_CONNECT or more.
_CUT_WHILE_UNREACHABLE: ContextVar[bool] = ContextVar("upstream_cut_while_unreachable", default=False)


def cut_while_unreachable() -> bool:
    """Whether the calling task's last attempt was cancelled while its TCP connection request
    had gone unanswered long enough to say the upstream is unreachable (client/failures.py):
    the cancel cut it short, but the upstream's silence was already plain. Read once: it
    is cleared, so no later attempt of the task finds it."""
    cut = _CUT_WHILE_UNREACHABLE.get()
    _CUT_WHILE_UNREACHABLE.set(False)
    return cut


class UpstreamTransport:
    def __init__(
        self,
        base_url: str,
        timeout: float,
        max_connections: int,
        *,
        connect_timeout: float | None = None,
        proxy: str | None = None,
        ca_file: Path | None = None,
        metrics: Metrics | None = None,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        """`proxy`: every call goes through this HTTP proxy (None: HTTPS_PROXY and the rest
        of the environment decide). `ca_file`: trust this PEM bundle for the upstream's
        certificate (None: SSL_CERT_FILE / SSL_CERT_DIR, else certifi). ConfigError if
        either is unusable. At most `max_connections` sockets to the upstream, each idle
        one closed within `keepalive_expiry` seconds (reused for up to half of it).
        `metrics`: where each attempt is counted (None: a Metrics of its own, served
        nowhere: tests). `connect_timeout`: opening a connection (TCP, TLS, a proxy's tunnel)
        may take this many seconds, within `timeout` (None: only `timeout` bounds it); past it
        the upstream is unreachable."""
        self._metrics = metrics if metrics is not None else Metrics()
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._base_url = base_url.rstrip("/")
        self._route = route_to(self._base_url, proxy)
        # Built now: a bad bundle stops construction, not the first call.
        self._ssl_context = upstream_ssl_context(ca_file)
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        # Opened on the first call: aiohttp's session belongs to the running event loop.
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post_json(
        self,
        path: str,
        body: dict[str, Any],
        token: Secret | None,
        deadline: float | None,
        *,
        probe_timeout: float | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> UpstreamReply:
        """POST `body` as JSON; bounded by the upstream timeout and the caller's deadline.

        `probe_timeout`: the call probes a down deployment, and is cut off this many
        seconds from now, whatever the caller's deadline (then UNAVAILABLE, not the
        caller's DEADLINE_EXCEEDED). `traceparent`/`tracestate` (already validated) go
        along as W3C trace headers. Any answer with a status is returned; a failure
        without one raises ServiceError.
        """
        budget = AttemptBudget(self._timeout, deadline, probe_timeout, self._connect_timeout)
        seconds = budget.seconds()
        if seconds < MIN_EXCHANGE and budget.bound is Bound.CALLER:
            raise errors.timed_out(by_caller_deadline=True)  # (almost) no time left: nothing sent
        session = self._session
        if session is None:
            session = self._session = open_session(
                self._max_connections, self._ssl_context, self._keepalive_expiry
            )
        elif session.closed:  # `close` under way: aiohttp would raise RuntimeError
            raise not_ready("the upstream transport was closed")
        headers = call_headers(token, traceparent, tracestate)
        content = orjson.dumps(body)
        _CUT_WHILE_UNREACHABLE.set(False)
        with AttemptMetric(self._metrics) as attempt:
            current = ATTEMPT.set(budget)
            try:
                # One timer: on the wait for a free connection, then, set anew once there
                # is one (budget.py), on connecting, sending, and the body to its last byte
                # (a trickle included).
                async with asyncio.timeout(seconds) as budget.timer:
                    reply = await exchange(
                        session, self._route, self._url(path), content, headers, MAX_RESPONSE_BYTES
                    )
            except Exception as exc:
                # Where it was (the pool's wait, connecting, the exchange) says what a timeout means.
                failure = classify(exc, budget, PHASE.get())
                attempt.outcome = failure.label
                if failure.error is None:
                    raise
                raise failure.error from None
            except asyncio.CancelledError:
                if PHASE.get() is Phase.CONNECT and budget.connect_went_unanswered():
                    _CUT_WHILE_UNREACHABLE.set(True)
                raise
            finally:
                ATTEMPT.reset(current)
            attempt.outcome = reply.status
            return reply

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self._base_url + path)
        return url
