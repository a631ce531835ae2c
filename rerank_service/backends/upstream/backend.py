"""The upstream backend: a hosted rerank HTTP API behind the gRPC contract."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import orjson

from rerank_service.backends.upstream import errors
from rerank_service.backends.upstream.client.budget import MIN_EXCHANGE
from rerank_service.backends.upstream.client.connections import check_connection_settings
from rerank_service.backends.upstream.client.transport import (
    UpstreamReply,
    UpstreamTransport,
    cut_while_unreachable,
)
from rerank_service.backends.upstream.dialect import (
    Dialect,
    DialectOptions,
    MalformedResponse,
    UpstreamAnswer,
)
from rerank_service.backends.upstream.dialects import build_dialect
from rerank_service.backends.upstream.request_ids import checked_request_id
from rerank_service.backends.upstream.retry import RetryPolicy, Verdict, judge
from rerank_service.backends.upstream.tokenizer import TokenizerWindow, shared_tokenizer
from rerank_service.config.secret import Secret, redact
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.core.chunking import CallLimits, estimate_tokens
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CallContext,
    DeploymentState,
    ModelInfo,
    ServiceError,
    Timings,
    not_ready,
)
from rerank_service.core.health import DeploymentHealth, Outcome
from rerank_service.core.readiness import Readiness
from rerank_service.core.retry_budget import FALLBACK_READY
from rerank_service.core.token_window import EstimatedWindow
from rerank_service.observability import tracing
from rerank_service.observability.logging import get_logger
from rerank_service.observability.metrics import Metrics

_log = get_logger("rerank_service.upstream")


@dataclass(frozen=True, slots=True)
class _UpstreamModel:
    documents_per_call: int
    tokens_per_call: int
    max_query_tokens: int
    honours_instruct: bool


# What DashScope documents for its hosted models (its two formats only); other names, and
# every other format, get the configured limits.
_DASHSCOPE_FORMATS = frozenset({"dashscope", "compatible"})
_KNOWN_MODELS: dict[str, _UpstreamModel] = {
    "qwen3-rerank": _UpstreamModel(500, 120_000, 4000, True),
    "qwen3-vl-rerank": _UpstreamModel(100, 120_000, 8000, True),
    "gte-rerank-v2": _UpstreamModel(500, 30_000, 4000, False),
}


class UpstreamBackend:
    """Forwards each request to the configured rerank HTTP API."""

    def __init__(
        self,
        dialect: Dialect,
        path: str | None,
        transport_factory: Callable[[], UpstreamTransport],
        models: list[ModelInfo],
        call_limits: dict[str, CallLimits],
        api_key: Secret | None,
        pass_through: bool,
        secrets: list[Secret],
        retry_policy: RetryPolicy,
        health: DeploymentHealth,
        timeout: float,
        metrics: Metrics | None = None,
        url: str | None = None,
    ) -> None:
        self._dialect = dialect
        self._path = path or dialect.path
        # What each attempt's span says of where it went (OpenTelemetry's HTTP client
        # conventions; the URL without credentials, which the settings never let in a query).
        self._span_attributes = _span_attributes(dialect.name, url, self._path)
        self._transport_factory = transport_factory
        self._transport: UpstreamTransport | None = None
        self._models = models
        # Models that take no instruction (gte-rerank-v2): a caller's is not sent, as
        # ListModels says (supports_instruct false) and the access log (instruct_ignored).
        self._ignore_instruct = frozenset(model.name for model in models if not model.supports_instruct)
        self._call_limits = call_limits
        self._api_key = api_key
        self._pass_through = pass_through
        self._secrets = secrets
        self._retry_policy = retry_policy
        self._health = health
        self._health.on_change(self._update_readiness)
        self._readiness = Readiness()
        # Without a caller deadline, attempts and the waits between them fit in this.
        self._timeout = timeout
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        # Where retries are counted (None: a Metrics of its own, served nowhere: tests).
        self._metrics = metrics if metrics is not None else Metrics()

    @classmethod
    def from_config(cls, config: UpstreamDeploymentConfig, metrics: Metrics | None = None) -> UpstreamBackend:
        url_path = urllib.parse.urlsplit(config.connection.url).path
        options = DialectOptions(config.score_transform, config.prompt_template, url_path, config.path)
        dialect = build_dialect(config.format, options)
        documents_per_call = config.documents_per_call or dialect.documents_per_call
        configured = _UpstreamModel(
            documents_per_call, config.tokens_per_call, config.max_query_tokens, dialect.honours_instruct
        )
        known_models = _KNOWN_MODELS if dialect.name in _DASHSCOPE_FORMATS else {}
        connection = config.connection
        upstream_url = without_credentials(connection.url)
        models, call_limits = [], {}
        # Read here, on the event loop at a reload, unless a deployment uses it already.
        tokenizer = shared_tokenizer(config.tokenizer) if config.tokenizer else None
        for name in config.models:
            known = known_models.get(name, configured)
            max_query_tokens = min(known.max_query_tokens, config.max_query_tokens)
            models.append(
                ModelInfo(
                    name=name,
                    # The service splits larger calls into chunks, so its own limit applies.
                    max_documents=config.max_documents,
                    max_query_tokens=max_query_tokens,
                    supports_instruct=known.honours_instruct,
                    backend="upstream",
                    format=dialect.name,
                    upstream_url=upstream_url,
                )
            )
            call_limits[name] = CallLimits(
                max_documents=min(known.documents_per_call, documents_per_call),
                max_tokens=min(known.tokens_per_call, config.tokens_per_call),
                # No tokenizer here: the engine checks the query's estimated tokens.
                max_query_tokens=max_query_tokens,
                # The upstream cuts each document at its item limit: long documents are cut
                # or chunked to it, counted by the named tokenizer or estimated.
                window=EstimatedWindow(known.max_query_tokens)
                if tokenizer is None
                else TokenizerWindow(tokenizer, known.max_query_tokens),
            )

        recorded = metrics if metrics is not None else Metrics()  # the backend's and its transport's

        def transport_factory() -> UpstreamTransport:
            return UpstreamTransport(
                connection.url,
                connection.timeout,
                connection.max_connections,
                connect_timeout=connection.connect_timeout,
                proxy=connection.proxy,
                ca_file=connection.ca_file,
                metrics=recorded,
            )

        # Checked now: a bad CA file or proxy stops start-up as a configuration error
        # (exit 2) before the port opens, not when the backend starts.
        check_connection_settings(connection.url, connection.proxy, connection.ca_file)

        return cls(
            dialect=dialect,
            path=config.path,
            transport_factory=transport_factory,
            models=models,
            call_limits=call_limits,
            api_key=config.api_key,
            pass_through=config.pass_through,
            # An upstream can only echo what it was sent: its key, or the caller's (added per call).
            secrets=[config.api_key] if config.api_key is not None else [],
            retry_policy=RetryPolicy(
                config.retry.max_attempts, config.retry.backoff, config.retry.max_backoff
            ),
            health=DeploymentHealth(
                config.breaker.failures,
                config.breaker.cooldown,
                window=config.breaker.window,
                probe_timeout=config.breaker.probe_timeout,
            ),
            timeout=connection.timeout,
            metrics=recorded,
            url=upstream_url,
        )

    @property
    def readiness(self) -> Readiness:
        """Started (whether it is down is `health`'s to say: the router asks it)."""
        return self._readiness

    def _update_readiness(self) -> None:
        self._readiness.set(self._transport is not None)

    @property
    def health(self) -> DeploymentHealth:
        return self._health

    def models(self) -> list[ModelInfo]:
        return list(self._models)

    def call_limits(self, model: str) -> CallLimits:
        return self._call_limits[model]

    async def start(self) -> None:
        if self._transport is None:
            self._transport = self._transport_factory()
        self._update_readiness()

    async def close(self) -> None:
        # Taken first: while aiohttp closes its session (an await), a call (a single-flight
        # waiter woken by another's failure, a retry) must find the backend closed (not
        # ready: it falls back), not the closing session (RuntimeError: INTERNAL).
        transport, self._transport = self._transport, None
        self._update_readiness()
        if transport is not None:
            await transport.close()

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        """One upstream call, repeated while the failure is retryable and time is left."""
        if self._transport is None:
            raise not_ready("the upstream backend is not started")
        token = self._credentials(context)
        if request.instruct is not None and request.model in self._ignore_instruct:
            request = dataclasses.replace(request, instruct=None)
        body = self._dialect.build_body(request)
        # The waits between attempts must end before the caller's deadline (or, with
        # none, within the upstream timeout), leaving the next attempt some time.
        give_up_at = context.deadline if context.deadline is not None else time.monotonic() + self._timeout
        spans: list[tuple[float, float]] = []  # each attempt's time on the wire, for the edge
        attempt = 1
        while True:
            try:
                probe = self._health.admit()
            except ServiceError as refused:  # down, or went down while this call waited to retry
                raise refused.with_timings(Timings(upstream_spans=tuple(spans))) from None
            outcome = Outcome.NEUTRAL  # if cancelled mid-attempt: says nothing about the upstream
            unreachable = answered = recorded = False
            # A probe of a down upstream gets a short time: a hanging probe holds no caller long.
            probe_timeout = self._health.probe_timeout if probe else None
            try:
                answer = await self._attempt(request, body, token, context, probe_timeout, spans, attempt)
                outcome = Outcome.SUCCESS
                timings = Timings(upstream_spans=tuple(spans))
                request_id = checked_request_id(answer.request_id, self._secrets_of(token))
                if answer.total_tokens is None:  # a format without usage: the service counts
                    return BackendResult(
                        answer.scores, _estimated_tokens(request), request_id, timings, "estimate"
                    )
                return BackendResult(answer.scores, answer.total_tokens, request_id, timings)
            except ServiceError as error:
                # Less than MIN_EXCHANGE left is no time: the transport sends nothing then.
                out_of_time = (
                    context.deadline is not None and time.monotonic() >= context.deadline - MIN_EXCHANGE
                )
                verdict = judge(error, out_of_time, self._pass_through)
                outcome, unreachable = verdict.outcome, error.unreachable
                answered = _answered(error)
                # A 429 to a caller's own token (pass-through) is its own quota: the deployment
                # is not avoided for the others (this call may still fall over: below).
                rate_limited = _rate_limited(error) and not self._pass_through
                self._health.record(outcome, probe, unreachable, answered, rate_limited, error.retry_after)
                recorded = True
                wait = self._wait_before_retry(error, verdict, attempt, give_up_at, context)
                if wait is None:  # the time of every attempt goes up with the error
                    raise error.with_timings(Timings(upstream_spans=tuple(spans))) from error
            except asyncio.CancelledError:
                # Cut short (grpc at the caller's deadline, the caller gone) while its connect
                # had long gone unanswered: the upstream is unreachable, as if it had timed out.
                if cut_while_unreachable():
                    outcome, unreachable = Outcome.FAILURE, True
                raise
            finally:
                if not recorded:  # a success, or cancelled mid-attempt
                    self._health.record(outcome, probe, unreachable, answered)
            await asyncio.sleep(wait)
            attempt += 1

    def _wait_before_retry(
        self, error: ServiceError, verdict: Verdict, attempt: int, give_up_at: float, context: CallContext
    ) -> float | None:
        """How long to wait before retrying a failed attempt, or None: give up now."""
        # Down now (this failure may have made it so): a retry would only be refused, or
        # be another probe (this one hung, say), which no caller is held for.
        # Rate limited where another deployment of the route could take the call: the route
        # falls over to it rather than the call waiting here to be refused again.
        if (
            not verdict.retryable
            or attempt >= self._retry_policy.max_attempts
            or self._health.state is DeploymentState.DOWN
            or (_rate_limited(error) and FALLBACK_READY.get())
        ):
            return None
        wait = self._retry_policy.wait_before(attempt, error.retry_after, self._rng)
        if time.monotonic() + wait >= give_up_at - MIN_EXCHANGE:  # a retry then would send nothing
            return None
        if context.retry_budget is not None and not context.retry_budget.try_spend():
            self._metrics.count_upstream_retry_refused()
            return None
        _log.warning(
            "upstream retry",
            attempt=attempt,
            failure=verdict.label,
            wait_ms=round(wait * 1000, 1),
            upstream_request_id=error.upstream_request_id,
        )
        self._metrics.count_upstream_retry(verdict.label)
        return wait

    async def _attempt(
        self,
        request: BackendRequest,
        body: dict[str, Any],
        token: Secret | None,
        context: CallContext,
        probe_timeout: float | None,
        spans: list[tuple[float, float]],
        attempt: int,
    ) -> UpstreamAnswer:
        """One HTTP exchange and its answer read; its time on the wire goes into `spans`.
        `probe_timeout`: it probes a down deployment, cut off after this many seconds.
        With tracing on it is a client span, whose context the upstream is sent."""
        transport = self._transport
        if transport is None:
            # Closed while this call waited to retry (a reload's grace ran out): the call
            # falls back, as one refused by a backend not started.
            raise not_ready("the upstream backend was closed while the call waited to retry")
        span = tracing.child("POST", self._span_attributes, client=True)
        traceparent = context.traceparent
        if span is not None:
            traceparent = span.traceparent()
            if attempt > 1:
                span.set("http.request.resend_count", attempt - 1)
        started = time.perf_counter()
        try:
            try:
                reply = await transport.post_json(
                    self._path,
                    body,
                    token,
                    context.deadline,
                    probe_timeout=probe_timeout,
                    traceparent=traceparent,
                    tracestate=context.tracestate,
                )
            finally:
                spans.append((started, time.perf_counter()))
            if span is not None:
                span.set("http.response.status_code", reply.status)
            content = reply.content
            # A large body is decoded off the event loop (DECODE_IN_LOOP_BYTES); the usual one
            # here, without an await.
            if len(content) <= DECODE_IN_LOOP_BYTES:
                decoded = _decode_json(content)
            else:
                decoded = await asyncio.to_thread(_decode_json, content)
            return self._answer(reply, decoded, request, token)
        except ServiceError as error:
            if span is not None:
                span.fail(error.reason or error.code.name)
            raise
        finally:
            if span is not None:
                span.end()

    def _answer(
        self, reply: UpstreamReply, decoded: Any, request: BackendRequest, token: Secret | None
    ) -> UpstreamAnswer:
        """The upstream's answer checked and read (its body `decoded`, _NOT_JSON if not
        JSON), or the error its status or body says."""
        secrets = self._secrets_of(token)
        if not 200 <= reply.status < 300:
            said = self._dialect.parse_error(decoded)
            raise errors.from_http_status(
                reply.status,
                dataclasses.replace(said, request_id=checked_request_id(said.request_id, secrets)),
                reply.headers.get("retry-after"),
                self._pass_through,
                secrets,
            )
        if decoded is _NOT_JSON:
            raise errors.not_json(reply.status, reply.headers.get("content-type"), secrets)
        try:
            return self._dialect.parse_answer(decoded, request)
        except MalformedResponse as exc:
            request_id = checked_request_id(self._dialect.parse_error(decoded).request_id, secrets)
            raise errors.malformed(redact(str(exc), secrets), request_id) from None

    def _secrets_of(self, token: Secret | None) -> list[Secret]:
        """What must never reach a caller from an upstream's answer: every configured key
        and this call's own credential (a caller's pass-through token included)."""
        return self._secrets if token is None or token in self._secrets else [*self._secrets, token]

    def _credentials(self, context: CallContext) -> Secret | None:
        if not self._pass_through:
            return self._api_key
        if context.bearer_token is None:
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED,
                "this service passes callers' credentials to the upstream: send "
                "'authorization: Bearer <upstream API key>' (gRPC metadata, or the HTTP header)",
                reason="MISSING_CREDENTIALS",
            )
        return context.bearer_token


def _answered(error: ServiceError) -> bool:
    """An answer came back (a status, or a body it could not use): the deployment is
    reachable, whatever it said. A timeout or a reset is no answer."""
    return "upstream_status" in error.metadata or error.reason == errors.BAD_RESPONSE


def _rate_limited(error: ServiceError) -> bool:
    """The upstream answered 429."""
    return error.metadata.get("upstream_status") == "429"


def _span_attributes(format_name: str, url: str | None, path: str) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {"http.request.method": "POST", "gen_ai.provider.name": format_name}
    if url is None:
        return attributes
    parts = urllib.parse.urlsplit(url)
    attributes["url.full"] = url.rstrip("/") + "/" + path.lstrip("/")
    if parts.hostname:
        attributes["server.address"] = parts.hostname
    attributes["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    return attributes


def _estimated_tokens(request: BackendRequest) -> int:
    """The chunker's estimate of what the call costs: the query once per document, plus
    every document."""
    documents = request.documents
    return len(documents) * estimate_tokens(request.query) + sum(map(estimate_tokens, documents))


def without_credentials(url: str) -> str:
    """`url` without any `user:password@` (what ListModels may show of the upstream)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


_NOT_JSON: Any = object()

# An upstream body longer than this is decoded in a thread: a body may be up to 16 MiB,
# and one that orjson refuses is read again by json (and encoded again to check it),
# hundreds of milliseconds during which every route's calls on the event loop would wait.
# (Each decoder step holds the GIL, so the loop still waits on one step, not on them all.)
# Shorter ones, the hot path (a 20-document answer is 1-2 KiB, a 500-document one tens of
# KiB), are decoded on the loop in well under a millisecond, cheaper than the thread hop.
DECODE_IN_LOOP_BYTES = 256 * 1024


def _decode_json(content: bytes) -> Any:
    try:
        return orjson.loads(content)  # several times faster than json on large answers
    except orjson.JSONDecodeError:
        pass
    try:
        # What orjson refuses but Python's json reads (NaN, Infinity): the dialect then
        # rejects such a score as a broken contract rather than as a body that is not JSON.
        value = json.loads(content)
        # Not what orjson refuses for other reasons that json lets through: a lone surrogate
        # (`"\ud800"`), text no status message or metadata can carry.
        json.dumps(value, ensure_ascii=False).encode()
    except (ValueError, UnicodeError, RecursionError):  # RecursionError: nested past json's limit
        return _NOT_JSON
    return value
