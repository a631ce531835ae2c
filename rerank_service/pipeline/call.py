"""One call's steps, the same for every entry point: a gRPC unary call, each RerankStream
item, an HTTP call. The front doors (api/grpc/, api/http/) translate their wire format to and
from these steps and decide nothing else; the steps are here, in order, but for admission,
which the front doors share (they know when a body or a stream's item arrives):

1. `Pipeline.open`: the call's request id (bound, so every log line below carries it)
   and its in-flight metric;
2. `Pipeline.authenticate`: the caller, from its bearer token or its client certificate
   (UNAUTHENTICATED), which a front door checks as soon as it has the headers
   (pipeline/callers.py);
3. `admit_open` (gRPC: the call counted open as soon as it arrives, before its request
   has, and against its caller's share of the open calls until it holds a slot), then
   `admit_call` once the request is in (or `admit_bytes` then `admit_call`, for a front
   door that learns the size before it reads the body): a slot and the request's bytes
   (RESOURCE_EXHAUSTED past the bounds or the caller's share, admission.py); where it
   raises SlotWait (every slot taken, the caller under its fair share, another past its)
   the front door awaits `admitted`, the next slot released. A RerankStream only counts
   itself open here: the gRPC edge admits its items as they come (api/grpc/edge.py's
   _StreamItems), and the HTTP door asks admission itself whether a call that sends
   `Expect: 100-continue` would get in;
4. `rerank`: the engine's validation (every field, the model checked against the
   caller's: PERMISSION_DENIED), its preparation (long documents, chunks, the fan-out
   bound), the caller's deadline (DEADLINE_EXCEEDED once passed), the caller's limits
   on what will be scored (RESOURCE_EXHAUSTED, limits.py), then the engine's run; the
   outcome is kept as a value;
5. `finish`: what was admitted given back, the call's metrics, its limits settled and
   its caller's usage (usage.py), then one log line, from the values gathered (the
   outcome, or the error and its code), and its span ended.

With tracing on, `open` also opens the call's span (observability/tracing.py) under the
caller's trace context and makes it current: what the call does below (the route, each
upstream attempt, a local model's queue and forward pass) hangs under it.

A step every call takes (per-caller limits, a span) is added here, once; the score cache
sits below, in front of each deployment (routing/cached_scores.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextvars import Token

import grpc

from rerank_service.config.callers import ANONYMOUS
from rerank_service.config.secret import Secret, key_fault
from rerank_service.core.domain import (
    Attempted,
    CacheOutcome,
    CallContext,
    RerankOutcome,
    RerankRequest,
    ServiceError,
    echo,
    replaced,
)
from rerank_service.core.engine import RerankEngine
from rerank_service.observability import tracing
from rerank_service.observability.logging import get_logger
from rerank_service.observability.metrics import MethodMetrics, Metrics
from rerank_service.observability.request_id import bind_request_id, new_request_id, unbind_request_id
from rerank_service.observability.tracing import CallTracer, SpanHandle
from rerank_service.pipeline.admission import PEER_PREFIX, Admission, SlotWait
from rerank_service.pipeline.callers import Caller, CallerDirectory
from rerank_service.pipeline.limits import Grant, Limiter
from rerank_service.pipeline.record import CallFacts, call_facts, log_call
from rerank_service.pipeline.usage import MeteredCall, UsageMeter

_log = get_logger("rerank_service.access")

# The codes that mark a server span failed (OpenTelemetry's gRPC conventions): the
# others are the caller's doing.
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})  # fmt: skip
# How a call ends when time ran out or its caller gave up: its tokens' estimate stays charged.
_ABANDONED = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


def internal_error(request_id: str) -> ServiceError:
    """What a caller is told of a bug: nothing but the id to quote (the log has the stack)."""
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")


def unauthenticated(missing: bool, carrier: str, certificate: str | None = None) -> ServiceError:
    """The refusal of a call without an accepted key; `carrier` says where the key goes
    (`'authorization: Bearer <key>' metadata`, `'Authorization: Bearer <key>' header`);
    `certificate`: the identity of a client certificate that names no caller, where the
    call carried no key."""
    if certificate is not None:
        message = (
            f"the client certificate's identity {echo(certificate)!r} is no caller's, and no {carrier} came"
        )
    else:
        message = f"missing {carrier}" if missing else "the bearer key is not accepted"
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message)


def own_name(caller: Caller | None) -> str | None:
    """The name a caller's share of the open calls and of the bodies arriving counts
    against: None where it is not known, is `anonymous` (no keys: every call's), or is named
    after its token (pass-through)."""
    # A caller named after its token (pass-through: the upstream checks it) is no caller of
    # its own here: junk tokens, one a connection, would each get a share.
    return None if caller is None or caller.name == ANONYMOUS or caller.per_token else caller.name


def body_holder(caller: Caller | None, peer: str) -> str:
    """Whose share the bytes of an HTTP body still arriving count against: its caller's,
    known from the headers, else its client address's (`peer`)."""
    name = own_name(caller)
    return PEER_PREFIX + peer if name is None else name


class Pipeline:
    """The steps every call takes, bound to the server's engine, limits, keys and metrics."""

    def __init__(
        self,
        engine: RerankEngine,
        admission: Admission,
        callers: CallerDirectory,
        metrics: Metrics | None = None,
        *,
        limiter: Limiter | None = None,
        usage: UsageMeter | None = None,
        tracer: CallTracer | None = None,
    ) -> None:
        self.engine = engine
        self.admission = admission
        self.callers = callers
        # Where every call is counted; the front doors bind their methods' children from it
        # (None: a Metrics of its own, served nowhere, for a pipeline built in a test).
        self.metrics = metrics if metrics is not None else Metrics()
        # The callers' limits (per process unless given a store), and what each used.
        self.limiter = limiter if limiter is not None else Limiter()
        self.usage = usage if usage is not None else UsageMeter(self.metrics.callers)
        # Each call's span (None: tracing off, and nothing of it on the call path).
        self.tracer = tracer

    def open(
        self,
        method: str,
        peer: str,
        measured: MethodMetrics,
        *,
        item_id: str | None = None,
        scoped: bool = True,
        caller: Caller | None = None,
        trace: tuple[str | None, str | None] = (None, None),
        stream: Call | None = None,
        started: float | None = None,
    ) -> Call:
        """Start a call: its request id, bound (`scoped`: unbound again at `finish`; a
        stream or a stream item runs in a task of its own, which ends with it). `caller`:
        known already (a stream's item: the stream's). `trace`: the caller's validated
        (traceparent, tracestate), the span's parent and what the upstream is sent;
        `stream`: the stream this call is an item of (recorded with it, or not at all);
        `started`: when it came (perf_counter's; None: now), a stream item read before it
        waited for a slot or room."""
        call = Call(self, method, peer, measured, item_id, scoped, started)
        call.caller = caller
        call.trace = trace
        tracer = self.tracer
        if tracer is not None:
            span = call.span = tracer.open_call(
                method,
                peer,
                trace[0],
                trace[1],
                call.started,
                item=stream is not None,
                stream=None if stream is None else stream.span,
            )
            if span is None and tracing.current() is not None:
                # Not sampled, in its stream's task (whose span is current there): none is
                # current for it, or what it does would be recorded under the stream's span.
                call._unspanned = tracing.make_current(None)
        return call

    def authenticate(self, token: Secret | None, carrier: str, peer_identities: Sequence[str] = ()) -> Caller:
        """The caller of a call with this bearer token and these client-certificate
        identities; UNAUTHENTICATED when callers or keys are set and none is named."""
        caller = self.callers.identify(token, peer_identities)
        # A pass-through token goes upstream as a header: one holding a control character or
        # a space (grpc takes such metadata from a raw HTTP/2 client) is no key (the key
        # loaders' rule), and aiohttp would refuse to write it, failing the call INTERNAL.
        if caller is not None and caller.per_token and token is not None and key_fault(token.reveal()):
            caller = None
        if caller is None:
            certificate = peer_identities[0] if token is None and peer_identities else None
            raise unauthenticated(token is None and not peer_identities, carrier, certificate)
        return caller

    def serves(self, model: str) -> bool:
        """Whether a route serves `model` (a name a caller sent may be anything)."""
        return any(info.name == model for info in self.engine.models())


class Call:
    """One call going through the pipeline: what it gathered so far, as values."""

    __slots__ = (
        "_arriving",
        "_bytes",
        "_grant",
        "_measured",
        "_open_as",
        "_opened",
        "_pipeline",
        "_share",
        "_slot",
        "_token",
        "_unspanned",
        "attempted",
        "caller",
        "code",
        "details",
        "documents",
        "failure",
        "http_status",
        "item_id",
        "method",
        "model",
        "outcome",
        "peer",
        "request_id",
        "span",
        "started",
        "trace",
    )  # fmt: skip

    def __init__(
        self,
        pipeline: Pipeline,
        method: str,
        peer: str,
        measured: MethodMetrics,
        item_id: str | None,
        scoped: bool,
        started: float | None = None,
    ) -> None:
        self._pipeline = pipeline
        self.method = method
        self.peer = peer
        self._measured = measured
        self.item_id = item_id
        self.started = time.perf_counter() if started is None else started
        self.request_id = new_request_id()
        token = bind_request_id(self.request_id)
        self._token: Token[str | None] | None = token if scoped else None
        measured.started()
        self.code: grpc.StatusCode = grpc.StatusCode.CANCELLED  # unless it gets further
        self.details: str | None = None
        # What the caller asked for: only calls let through say it (a refusal's log line
        # and the documents histogram do not count what was never served).
        self.documents: int | None = None
        self.model: str | None = None
        self.outcome: RerankOutcome | None = None
        self.failure: ServiceError | None = None
        self._opened = self._slot = False
        self._open_as: str | None = None  # whose share of the open calls it counts against
        self._bytes = 0
        # Whose share its HTTP body's bytes count against while the body arrives (None: it
        # took none, or it is in).
        self._arriving: str | None = None
        # Who calls (set once authenticated), what its limits granted, and the name its
        # admission slot counts against (None: no caller known).
        self.caller: Caller | None = None
        self._grant: Grant | None = None
        # The deployment it was last sent to (the router's), and what backends answered it
        # that its outcome will not carry (kept as it failed or was cancelled holding them).
        self.attempted = Attempted()
        self._share: str | None = None
        # Its span (tracing on and sampled), and the HTTP status it was answered with.
        self.span: SpanHandle | None = None
        # Set when it is not sampled inside a sampled stream: what `finish` restores.
        self._unspanned: Token[SpanHandle | None] | None = None
        self.http_status: int | None = None
        self.trace: tuple[str | None, str | None] = (None, None)  # the caller's, set by `open`

    @property
    def share_key(self) -> str | None:
        """The name this call's admission slots count against for the fair share."""
        caller = self.caller
        return None if caller is None else caller.name

    @property
    def share_capped(self) -> bool:
        """Whether the caller is held to the fair share (`Caller.held_to_share`; a call no
        caller is known for is)."""
        caller = self.caller
        return caller is None or caller.held_to_share

    def admit_open(self) -> None:
        """Count a gRPC call open (its caller's share of the open calls too), or
        RESOURCE_EXHAUSTED: from its start, before its request has come, so that calls
        whose requests are slow to come (or never do) hold at most the caller's share of
        --max-open-calls, each with what grpc has buffered of its request. A unary call
        then takes its slot (`admit_call`) once its request is in, and counts against that
        share no longer (the slots have their own: a caller alone may use them all, however
        few --max-open-calls leaves it beside them); a stream counts against it until it
        ends, its items taking slots and bytes as they come (api/grpc/edge.py's _StreamItems)."""
        self._open_as = own_name(self.caller)
        self._pipeline.admission.open_call(self._open_as)
        self._opened = True

    def admit(self, size: int) -> None:
        """`admit_open`, then `admit_call(size)`: a unary call whose request is in already."""
        self.admit_open()
        self.admit_call(size)

    def admit_bytes(self, size: int) -> None:
        """Take `size` bytes only (a body about to be read, its caller known), or
        RESOURCE_EXHAUSTED: past the budget, or past the share of it that the bodies still
        arriving of its caller (or its client address) may hold (`arrived` ends that)."""
        holder = body_holder(self.caller, self.peer)
        caller = self.caller.name if self.caller is not None else ANONYMOUS
        self._pipeline.admission.enter_body(size, holder, caller)
        self._bytes = size
        self._arriving = holder

    def arrived(self) -> None:
        """The body `admit_bytes` took bytes for is in: they stay taken until `finish`, but no
        longer count against its share of the bodies arriving."""
        if self._arriving is not None:
            self._pipeline.admission.body_arrived(self._bytes, self._arriving)
            self._arriving = None

    def admit_call(self, size: int = 0) -> None:
        """Take the call's slot and `size` more bytes (0: taken already, `admit_bytes`); or
        RESOURCE_EXHAUSTED, or SlotWait: every slot is taken and the call may wait for the
        next (`admitted`)."""
        self._share = self.share_key
        self._pipeline.admission.enter(size, self._share, capped=self.share_capped, may_wait=True)
        self._in_slot()
        self._bytes += size

    async def admitted(self, wait: SlotWait, within: float | None) -> None:
        """The slot `admit` or `admit_call` raised SlotWait for, waited for (a caller under its
        share, while another holds more than its: admission.py), with the bytes `admit` was to
        take; or RESOURCE_EXHAUSTED. `within`: seconds left to the call's deadline (None: none)."""
        await self._pipeline.admission.wait_for_slot(wait, within)
        self._in_slot()
        self._bytes += wait.size

    def _in_slot(self) -> None:
        """The call holds its slot: a unary gRPC call, open, no longer counts against its
        caller's share of the open calls (`admit_open`)."""
        self._slot = True
        if self._open_as is not None:
            self._pipeline.admission.release_open_share(self._open_as)
            self._open_as = None

    async def rerank(self, request: RerankRequest, context: CallContext) -> RerankOutcome:
        """The caller's model and deadline, its limits, then the engine; the outcome is kept
        for `finish`."""
        self.documents, self.model = len(request.documents), request.model
        if context.attempted is not self.attempted:  # a stream's items share one context
            context = replaced(context, attempted=self.attempted)
        caller = self.caller
        engine = self._pipeline.engine
        # Validated before the caller's limits are charged (a bad request costs it nothing),
        # asking whether it may call the model before the model is looked up.
        may_call = caller.check_model if caller is not None and caller.models is not None else None
        validated = engine.validate(request, may_call)
        # And every other refusal the engine makes by itself (long documents, fan-out), at
        # once (no await since validating): the call is pinned to the route it was validated
        # against, and runs there whatever a reload changes while it waits (its limits).
        prepared = await engine.prepare(request, validated)
        try:
            if context.deadline is not None and time.monotonic() >= context.deadline:
                raise ServiceError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the call ran"
                )
            if caller is not None and caller.limits is not None:
                limiter = self._pipeline.limiter
                # Tokens estimated on what will be scored (a long document's parts), documents
                # counted as the caller sent them.
                scored, documents = prepared.scored, self.documents
                if limiter.store is None:  # nothing to wait for: no coroutine either
                    self._grant = limiter.admit_here(caller, scored, documents=documents)
                else:
                    waiting = (
                        None
                        if self.span is None
                        else self.span.child("rerank.limits", {"rerank.caller": caller.name})
                    )
                    try:
                        self._grant = await limiter.admit(
                            caller, scored, self.request_id, context.deadline, documents=documents
                        )
                    finally:
                        if waiting is not None:
                            waiting.end()
            self.outcome = await engine.run(prepared, context)
        finally:
            prepared.release()
        return self.outcome

    def succeeded(self) -> None:
        self.code = grpc.StatusCode.OK

    def failed(self, error: ServiceError) -> None:
        """Record the error the call ends with (the front door answers it)."""
        self.failure, self.code, self.details = error, error.code, error.message

    def failed_with(self, code: grpc.StatusCode, details: str) -> None:
        """Record a failure the front door found itself (an HTTP media type, a body size)."""
        self.code, self.details = code, details

    def bug(self) -> ServiceError:
        """A bug (call inside `except`): logged with its stack, answered INTERNAL naming
        only the request id to quote."""
        _log.exception("unexpected error")
        error = internal_error(self.request_id)
        self.code, self.details = error.code, error.message
        return error

    def finish(self, *, items: int | None = None, event: str = "call") -> None:
        """Give back what was admitted, then record the call once: metrics and log line."""
        pipeline = self._pipeline
        admission = pipeline.admission
        if self._arriving is not None:  # its body never came in
            self.arrived()
        if self._slot:
            admission.release(self._bytes, self._share)
        elif self._bytes:
            admission.give_bytes(self._bytes)
        if self._opened:
            admission.close_call(self._open_as)
        if self._token is not None:
            unbind_request_id(self._token)
        seconds = time.perf_counter() - self.started
        facts = call_facts(
            self.method, self.peer, self.request_id, self.documents, self.model, self.outcome,
            self.failure, self.item_id, items, None if self.caller is None else self.caller.name,
            self.attempted.deployment,
        )  # fmt: skip
        span = self.span
        # Tokens of a successful call only: one answered that failed after (too large, never
        # sent) is no call whose tokens a caller was told.
        tokens = facts.total_tokens if self.code is grpc.StatusCode.OK else None
        self._measured.finished(
            self.code, seconds, self.documents, tokens, None if span is None else span.trace_id
        )
        if self.caller is not None:  # its limits settled before anything is written
            self._meter(seconds)
        log_call(facts, self.code, seconds, self.details, event)
        if span is not None:
            self._end_span(span, facts)
        if self._unspanned is not None:
            tracing.restore(self._unspanned)
            self._unspanned = None
        # The error's traceback holds the front door's frame, which may hold the request
        # (megabytes): dropped here, it goes at once, not when the cycle collector runs. So
        # does the outcome (the documents' text, where returned): grpc keeps what answered a
        # failed call (an answer too large) until a full collection, this call with it.
        self.failure = None
        self.outcome = None

    def _end_span(self, span: SpanHandle, facts: CallFacts) -> None:
        """What the call's span says of it (never the query, documents or a key), then its
        end: set at once (each attribute costs the exporter too, so only what a trace
        reader needs and cannot find elsewhere)."""
        code = self.code
        attributes: dict[str, str | int | list[str]] = (
            {"http.response.status_code": self.http_status}
            if self.http_status is not None
            else {"rpc.grpc.status_code": code.value[0]}
        )
        if facts.model is not None:
            attributes["gen_ai.operation.name"] = "rerank"
            attributes["gen_ai.request.model"] = echo(facts.model)  # cut, as the log line cuts it
        if facts.documents is not None:
            attributes["rerank.documents"] = facts.documents
        if facts.total_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = facts.total_tokens
        if facts.cache is not CacheOutcome.OFF:
            attributes["rerank.cache"] = facts.cache.value
            attributes["rerank.cached_tokens"] = facts.cached_tokens
        if facts.deployments:
            attributes["rerank.deployments"] = list(facts.deployments)
        if facts.caller is not None:
            attributes["rerank.caller"] = facts.caller
        if facts.items is not None:
            attributes["rerank.stream.items"] = facts.items
        span.set_many(attributes)
        if code is not grpc.StatusCode.OK:
            failure = self.failure
            reason = failure.reason if failure is not None and failure.reason else code.name
            # An HTTP call by its status (OpenTelemetry's HTTP conventions leave a 4xx server
            # span unset): a 408, a body that came too slowly, is DEADLINE_EXCEEDED, the
            # caller's doing; a gRPC call by its code.
            status = self.http_status
            failed = code in _SERVER_ERRORS if status is None else status >= 500
            if failed:
                span.fail(reason)
            else:  # the caller's mistake: the span is not an error of this service's
                span.set("error.type", reason)
        span.end()

    def _meter(self, seconds: float) -> None:
        """Settle the caller's limits and record what the call used (pipeline/usage.py)."""
        caller, outcome, pipeline = self.caller, self.outcome, self._pipeline
        assert caller is not None
        if self._grant is not None:
            if outcome is not None:
                # The backend answered: its count, whatever became of the call after (a
                # caller that hung up as its answer was sent was still billed it).
                used = outcome.total_tokens
            elif self.code in _ABANDONED:
                # Given up while the backend worked (the grant came just before it): the
                # upstream may have scored, and billed, the documents; the estimate stays.
                used = self._grant.tokens_taken
            else:
                # Failed: nothing was scored, but what backends answered before the failure
                # (a split call's chunks, an answer whose scores were being stored): billed.
                spent = self.attempted.spent
                used = spent.tokens if spent is not None else 0
            pipeline.limiter.settle(self._grant, used, pipeline.callers.limits_now(caller.name))
            self._grant = None
        model = self.model
        known = model is not None and (
            outcome is not None
            or (caller.models is not None and model in caller.models)
            or pipeline.serves(model)
        )
        metered = MeteredCall(
            caller, model, known, self.code, self.documents, outcome, self.failure,
            self.request_id, self.method, seconds, self.attempted.spent, self.attempted.deployment,
        )  # fmt: skip
        pipeline.usage.record(metered)
