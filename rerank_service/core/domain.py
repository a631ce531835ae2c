"""The vocabulary every module speaks: requests, scores, outcomes and errors.

Plain dataclasses, no protobuf: the servicer translates proto to these and back,
and backends only ever see these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from rerank_service.config.secret import Secret

# The hosted API's default task, used when a request carries no instruct.
DEFAULT_INSTRUCT = "Given a web search query, retrieve relevant passages that answer the query."


@dataclass(frozen=True, slots=True)
class RerankRequest:
    """One call's input, as the caller sent it (validated by the engine)."""

    model: str
    query: str
    documents: list[str]
    top_n: int | None = None
    instruct: str | None = None
    return_documents: bool = False


@dataclass(frozen=True, slots=True)
class CallContext:
    """What the caller brings besides the request: deadline and credentials."""

    # Absolute deadline on the time.monotonic() clock, or None for no deadline.
    deadline: float | None = None
    # The caller's bearer token; forwarded upstream only in pass-through mode.
    bearer_token: Secret | None = None
    # The id the service gave this call; the call's request id unless an upstream names it.
    request_id: str | None = None
    # The caller's W3C trace context, already validated: passed on to the upstream.
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True, slots=True)
class BackendRequest:
    """What a backend is asked to score: one model, one query, some documents."""

    model: str
    query: str
    documents: list[str]
    instruct: str | None
    # A hint: the backend may return only the best `top_n` scores.
    top_n: int | None


# The two records made once per document are not frozen: a frozen dataclass's
# __init__ sets each field through object.__setattr__, about six times the cost of a
# plain one, which counts at thousands of documents per call. Nothing changes them
# after they are made; treat them as values all the same.
@dataclass(slots=True)
class ScoredDocument:
    """A document's index into the backend request, and its score in [0, 1]."""

    index: int
    score: float


@dataclass(frozen=True, slots=True)
class BackendResult:
    """A backend's answer: scores (any order), tokens used, its request id if any."""

    scores: list[ScoredDocument]
    total_tokens: int
    request_id: str | None = None


@dataclass(slots=True)  # not frozen: see ScoredDocument
class RankedDocument:
    """One entry of the final ranking."""

    index: int
    score: float
    text: str | None = None


@dataclass(frozen=True, slots=True)
class RerankOutcome:
    """The final answer to a RerankRequest."""

    request_id: str
    results: list[RankedDocument]
    total_tokens: int
    # The upstream's request id of every backend call made (one per chunk).
    upstream_request_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served model and the limits a request must respect."""

    name: str
    max_documents: int
    max_query_tokens: int
    supports_instruct: bool
    backend: str


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field and why."""

    field: str
    description: str


@dataclass(slots=True)
class ServiceError(Exception):
    """An error with the gRPC status a caller should see.

    `reason` becomes a google.rpc.ErrorInfo, `violations` a google.rpc.BadRequest,
    `retry_after` a google.rpc.RetryInfo; `metadata` goes into ErrorInfo too.
    """

    code: grpc.StatusCode
    message: str
    reason: str | None = None
    violations: list[FieldViolation] = field(default_factory=list)
    retry_after: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    request_id: str | None = None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


# Errors travel in HTTP/2 trailers, which gRPC caps at a few KiB: an error must never
# echo unbounded caller input (thousands of violations, a megabyte model name).
MAX_ECHOED_CHARS = 64
MAX_VIOLATIONS_IN_MESSAGE = 5


def echo(text: str) -> str:
    """Caller input quoted in an error, cut to a bounded length."""
    return text if len(text) <= MAX_ECHOED_CHARS else text[: MAX_ECHOED_CHARS - 1] + "…"


def invalid_argument(violations: list[FieldViolation]) -> ServiceError:
    shown = violations[:MAX_VIOLATIONS_IN_MESSAGE]
    summary = "; ".join(f"{v.field}: {v.description}" for v in shown)
    if len(violations) > len(shown):
        summary += f"; and {len(violations) - len(shown)} more"
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {summary}", violations=violations
    )


def not_ready(why: str) -> ServiceError:
    """A backend that cannot take calls yet (loading a model, not started)."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, why, reason="BACKEND_NOT_READY")


def model_not_found(model: str, served: list[str]) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"model {echo(model)!r} is not served here; served models: {', '.join(served)}",
        reason="MODEL_NOT_FOUND",
        metadata={"model": echo(model), "served_models": ",".join(served)},
    )
