"""One call's steps, the same for every entry point: a gRPC unary call, each RerankStream
item, an HTTP call. The front doors (api/grpc/, api/http/) translate their wire format to and
from these steps and decide nothing else; each step is written once, here:

1. `Pipeline.open`: the call's request id (bound, so every log line below carries it)
   and its in-flight metric;
2. `Pipeline.authenticate`: the caller, from its bearer token (UNAUTHENTICATED), which
   a front door checks as soon as it has the headers;
3. `admit` (or `admit_bytes` then `admit_call`, for a front door that learns the size
   before it reads the body): a slot and the request's bytes (RESOURCE_EXHAUSTED past
   the bounds, admission.py);
4. `rerank`: the caller's deadline (DEADLINE_EXCEEDED once passed), then the engine;
   the outcome is kept as a value;
5. `finish`: what was admitted given back, then one log line and the call's metrics,
   from the values gathered (the outcome, or the error and its code).

A step every call takes (per-caller limits, a score cache, a span) is added here, once.
"""

from __future__ import annotations

import time
from contextvars import Token

import grpc

from rerank_service.config.secret import Secret
from rerank_service.core.domain import CallContext, RerankOutcome, RerankRequest, ServiceError
from rerank_service.core.engine import RerankEngine
from rerank_service.observability import metrics
from rerank_service.observability.logging import get_logger
from rerank_service.observability.request_id import bind_request_id, new_request_id, unbind_request_id
from rerank_service.pipeline.admission import Admission
from rerank_service.pipeline.auth import KeyChecker
from rerank_service.pipeline.record import call_facts, log_call

_log = get_logger("rerank_service.access")


def internal_error(request_id: str) -> ServiceError:
    """What a caller is told of a bug: nothing but the id to quote (the log has the stack)."""
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")


def unauthenticated(missing: bool, carrier: str) -> ServiceError:
    """The refusal of a call without an accepted key; `carrier` says where the key goes
    (`'authorization: Bearer <key>' metadata`, `'Authorization: Bearer <key>' header`)."""
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED, f"missing {carrier}" if missing else "the bearer key is not accepted"
    )


class Pipeline:
    """The steps every call takes, bound to the server's engine, limits and keys."""

    def __init__(self, engine: RerankEngine, admission: Admission, checker: KeyChecker) -> None:
        self.engine = engine
        self.admission = admission
        self.checker = checker

    def open(
        self,
        method: str,
        peer: str,
        measured: metrics.MethodMetrics,
        *,
        item_id: str | None = None,
        scoped: bool = True,
    ) -> Call:
        """Start a call: its request id, bound (`scoped`: unbound again at `finish`; a
        stream or a stream item runs in a task of its own, which ends with it)."""
        return Call(self, method, peer, measured, item_id, scoped)

    def authenticate(self, token: Secret | None, carrier: str) -> None:
        """Refuse a call unless its bearer token is one of the keys (when keys are set)."""
        if self.checker.enabled and not self.checker.accepts(token):
            raise unauthenticated(token is None, carrier)

    @staticmethod
    def refused_at_once(measured: metrics.MethodMetrics, code: grpc.StatusCode, documents: int) -> str:
        """A call refused before it opened (a duplicate stream item id): counted, and its
        request id to answer with."""
        measured.started()
        measured.finished(code, 0.0, documents, None)
        return new_request_id()


class Call:
    """One call going through the pipeline: what it gathered so far, as values."""

    __slots__ = (
        "_bytes",
        "_measured",
        "_opened",
        "_pipeline",
        "_slot",
        "_token",
        "code",
        "details",
        "documents",
        "failure",
        "item_id",
        "method",
        "model",
        "outcome",
        "peer",
        "request_id",
        "started",
    )  # fmt: skip

    def __init__(
        self,
        pipeline: Pipeline,
        method: str,
        peer: str,
        measured: metrics.MethodMetrics,
        item_id: str | None,
        scoped: bool,
    ) -> None:
        self._pipeline = pipeline
        self.method = method
        self.peer = peer
        self._measured = measured
        self.item_id = item_id
        self.started = time.perf_counter()
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
        self._bytes = 0

    def admit_stream(self) -> None:
        """Count a stream open, or RESOURCE_EXHAUSTED; its items take slots and bytes as
        they come (api/grpc/edge.py's _StreamItems)."""
        self._pipeline.admission.open_call()
        self._opened = True

    def admit(self, size: int) -> None:
        """Count the call open, then take a slot and `size` bytes; or RESOURCE_EXHAUSTED."""
        self.admit_stream()
        self._pipeline.admission.enter(size)
        self._slot = True
        self._bytes = size

    def admit_bytes(self, size: int) -> None:
        """Take `size` bytes only (a body about to be read), or RESOURCE_EXHAUSTED."""
        self._pipeline.admission.enter_bytes(size)
        self._bytes = size

    def admit_call(self) -> None:
        """Take the call's slot, its bytes taken already (`admit_bytes`)."""
        self._pipeline.admission.enter(0)
        self._slot = True

    async def rerank(self, request: RerankRequest, context: CallContext) -> RerankOutcome:
        """The caller's deadline, then the engine; the outcome is kept for `finish`."""
        self.documents, self.model = len(request.documents), request.model
        if context.deadline is not None and time.monotonic() >= context.deadline:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the call ran")
        self.outcome = await self._pipeline.engine.rerank(request, context)
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
        admission = self._pipeline.admission
        if self._slot:
            admission.release(self._bytes)
        elif self._bytes:
            admission.give_bytes(self._bytes)
        if self._opened:
            admission.close_call()
        if self._token is not None:
            unbind_request_id(self._token)
        seconds = time.perf_counter() - self.started
        facts = call_facts(
            self.method, self.peer, self.request_id, self.documents, self.model, self.outcome,
            self.failure, self.item_id, items,
        )  # fmt: skip
        self._measured.finished(self.code, seconds, self.documents, facts.total_tokens)
        log_call(facts, self.code, seconds, self.details, event)
        # The error's traceback holds the front door's frame, which may hold the request
        # (megabytes): dropped here, it goes at once, not when the cycle collector runs.
        self.failure = None
