"""The vocabulary every module speaks: requests, scores, outcomes and errors.

Plain dataclasses, no protobuf: the servicer translates proto to these and back,
and backends only ever see these.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, TypeVar

import grpc

from rerank_service.config.secret import Secret
from rerank_service.core.retry_budget import RetryBudget

# The contract's usage.total_tokens is an int32: counts are checked (upstream) or capped
# (a sum over chunks) to it.
MAX_TOKENS = 2**31 - 1

# The hosted API's default task, used when a request carries no instruct.
# Qwen3-Reranker's default instruction, as its model card writes it (no full stop).
DEFAULT_INSTRUCT = "Given a web search query, retrieve relevant passages that answer the query"


_Value = TypeVar("_Value")
# Per dataclass: its init fields' names, and one C call that reads them all.
_INIT_FIELDS: dict[type, tuple[tuple[str, ...], Callable[[Any], Any]]] = {}


def replaced(value: _Value, **changes: object) -> _Value:
    """`dataclasses.replace(value, **changes)` for the value objects on every call's path,
    without its Python loop over the fields and their kinds (several times the cost):
    the fields are read in one C call and the changes laid over them."""
    kind = type(value)
    known = _INIT_FIELDS.get(kind)
    if known is None:
        names = tuple(each.name for each in dataclasses.fields(kind) if each.init)  # type: ignore[arg-type]
        known = _INIT_FIELDS[kind] = (names, attrgetter(*names))
    names, read = known
    current = read(value)
    fields = dict(zip(names, current if len(names) > 1 else (current,), strict=True))
    fields.update(changes)
    return kind(**fields)


class LongDocuments(enum.Enum):
    """What the engine does with a document longer than the model's window (docs/LONG_DOCUMENTS.md)."""

    TRUNCATE = "truncate"  # cut it to the window; the result says `truncated`
    CHUNK = "chunk"  # score every part; the document's score is its best part's
    REJECT = "reject"  # refuse the call with INVALID_ARGUMENT naming the document


@dataclass(frozen=True, slots=True)
class RerankRequest:
    """One call's input, as the caller sent it (validated by the engine)."""

    model: str
    query: str
    documents: list[str]
    top_n: int | None = None
    instruct: str | None = None
    return_documents: bool = False
    # Long documents: None takes the route's default (TRUNCATE unless its config says).
    long_documents: LongDocuments | None = None
    # The window a document is cut or chunked to, in tokens (None: the deployment's).
    max_tokens_per_doc: int | None = None
    # Tokens two neighbouring chunks share (None: an eighth of the window).
    chunk_overlap_tokens: int | None = None


class CacheMode(enum.Enum):
    """What a call lets the cache do (the caller's `cache-control`, the route's `cache:`)."""

    READ_WRITE = "read-write"  # the default
    NO_READ = "no-cache"  # compute everything, store the scores
    OFF = "no-store"  # neither read nor store


class CacheOutcome(enum.StrEnum):
    """What the cache answered of a call (`x-cache`)."""

    HIT = "hit"  # every pair
    PARTIAL = "partial"  # some pairs
    MISS = "miss"  # none
    OFF = "off"  # the call did not use the cache


# Less than this left of a call's deadline is no time to send a request in: no backend
# answers a rerank that fast, and the request would be abandoned at once, its work wasted.
# No attempt, retry or fallback is made then (the upstream transport sends nothing).
NO_TIME_LEFT = 0.005


@dataclass(frozen=True, slots=True)
class CallContext:
    """What the caller brings besides the request: deadline and credentials."""

    # Absolute deadline on the time.monotonic() clock, or None for no deadline.
    deadline: float | None = None
    # The caller's bearer token; forwarded upstream only in pass-through mode.
    bearer_token: Secret | None = None
    # The caller's W3C trace context, already validated: passed on to the upstream.
    traceparent: str | None = None
    tracestate: str | None = None
    # Set by the router for the deployment it calls: what retries may spend.
    retry_budget: RetryBudget | None = None
    # What the score cache may do for this call: the caller's cache-control, then the
    # route's `cache:` (the router turns it off for a route that says so).
    cache_mode: CacheMode = CacheMode.READ_WRITE
    # Set by the engine for a call it pinned or a split call: where all its chunks go (CallPin).
    pin: CallPin | None = None
    # Given by the pipeline: the deployment the router last sent the call to, what a call
    # cancelled there (by grpc at its deadline, its caller gone) names, as a failure does;
    # and what its backends answered that its outcome will not carry (`Spent`).
    attempted: Attempted | None = None


class Attempted:
    """Where a call went below the pipeline, written as it goes: the deployment it was last
    sent to, by the router as it sends (a split call's chunks: the last chunk's); and what
    backends answered it that its outcome will not carry (None: nothing), kept as the call
    fails or is cancelled holding them."""

    __slots__ = ("deployment", "spent")

    def __init__(self) -> None:
        self.deployment: str | None = None
        self.spent: Spent | None = None  # made by the first answer kept: none on a call's way

    def spend(self, answers: Iterable[BackendResult]) -> Spent:
        """Keep `answers` as spent (each once: whoever keeps one, its call never gets it)."""
        spent = self.spent
        if spent is None:
            spent = self.spent = Spent()
        spent.answers.extend(answers)
        return spent


class Spent:
    """What backends answered a call that its outcome will not carry, billed upstream all the
    same, so metered (pipeline/usage.py): a split call's chunks answered before another failed
    it or it was cancelled (the engine keeps them), and an answer whose scores the score cache
    was storing when the call failed or was cancelled (routing/cached_scores.py)."""

    __slots__ = ("answers",)

    def __init__(self, answers: Iterable[BackendResult] = ()) -> None:
        self.answers = list(answers)  # each with the deployment that gave it

    @property
    def tokens(self) -> int:
        """Their tokens, capped as the contract's int32 is."""
        return min(sum(answer.total_tokens for answer in self.answers), MAX_TOKENS)

    @property
    def backend_calls(self) -> int:
        """The backend calls they took (a chunk the cache answered whole took none)."""
        return sum(answer.cache is not CacheOutcome.HIT for answer in self.answers)

    @property
    def deployments(self) -> list[str]:
        """The deployments that answered them from a backend (billed), each once."""
        return list(
            dict.fromkeys(
                answer.deployment
                for answer in self.answers
                if answer.deployment and answer.cache is not CacheOutcome.HIT
            )
        )

    @property
    def upstream_request_ids(self) -> list[str]:
        """The upstream ids they were answered under."""
        return [answer.upstream_request_id for answer in self.answers if answer.upstream_request_id]


class CallPin:
    """Where a call goes, every chunk of it: the route its limits were read from as the
    engine prepared it (a reload before it is sent must not send it to a route that takes
    fewer documents a request), or else where a split call's first chunk went (a reload
    between chunks must not send them to other routes: another model's scores in one
    ranking). The router fills it and holds what it chose open; the engine (or whoever
    prepared the call) releases the hold once the call ends."""

    __slots__ = ("_releases", "route")

    def __init__(self) -> None:
        self.route: object | None = None  # the router's: core knows nothing of routes
        self._releases: list[Callable[[], None]] = []

    def on_release(self, release: Callable[[], None]) -> None:
        self._releases.append(release)

    def release(self) -> None:
        for release in self._releases:
            release()
        self._releases.clear()


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
class Timings:
    """Where a call's time went below the edge; travels up with its answer or its error.

    `upstream_spans` are the (start, end) `time.perf_counter()` instants of each upstream
    HTTP attempt: chunks of a split call run side by side, so their upstream time is
    the length of the spans' union, not their sum, and waits between retries are in no span.
    """

    # Waiting for a chunk slot (upstream) or in the micro-batcher before the first batch (local).
    queue_seconds: float = 0.0
    # Time the model batches that held this call's pairs ran.
    inference_seconds: float = 0.0
    upstream_spans: tuple[tuple[float, float], ...] = ()

    @property
    def upstream_seconds(self) -> float:
        """Wall time with at least one upstream attempt of the call in flight."""
        total, reached = 0.0, float("-inf")
        for start, end in sorted(self.upstream_spans):
            if end > reached:
                total += end - max(start, reached)
                reached = end
        return total

    def waited(self, seconds: float) -> Timings:
        """The same timings after a further wait before the work began."""
        return Timings(self.queue_seconds + seconds, self.inference_seconds, self.upstream_spans)


NO_TIMINGS = Timings()


def cache_outcome(outcomes: list[CacheOutcome]) -> CacheOutcome:
    """One call's cache outcome from its chunks': all hit, none hit, or partly."""
    kinds = set(outcomes)
    if kinds <= {CacheOutcome.OFF}:
        return CacheOutcome.OFF
    if kinds == {CacheOutcome.HIT}:
        return CacheOutcome.HIT
    if kinds <= {CacheOutcome.MISS, CacheOutcome.OFF}:
        return CacheOutcome.MISS
    return CacheOutcome.PARTIAL


def combined(timings: list[Timings]) -> Timings:
    """The timings of one call from those of its chunks (run side by side).

    Queue: the longest wait, the one that held the call back. Inference: the model
    time of every chunk (one model runs them one after another). Upstream: all spans.
    """
    if len(timings) == 1:
        return timings[0]
    return Timings(
        queue_seconds=max((t.queue_seconds for t in timings), default=0.0),
        inference_seconds=sum(t.inference_seconds for t in timings),
        upstream_spans=tuple(span for t in timings for span in t.upstream_spans),
    )


@dataclass(frozen=True, slots=True)
class BackendResult:
    """A backend's answer: scores (any order), tokens used, the upstream's id if any."""

    scores: list[ScoredDocument]
    total_tokens: int
    upstream_request_id: str | None = None
    timings: Timings = NO_TIMINGS
    # "upstream" when the upstream reported its token count, "estimate" when the service
    # counted (an upstream format without usage), "model" for a local model's tokenizer.
    usage_source: str = "upstream"
    # The deployment that answered (set by the router).
    deployment: str | None = None
    # The score cache's part (routing/cached_scores.py): what it answered of these scores,
    # and their tokens (counted when the backend scored them; not in total_tokens).
    cache: CacheOutcome = CacheOutcome.OFF
    cached_tokens: int = 0


@dataclass(slots=True)  # not frozen: see ScoredDocument
class RankedDocument:
    """One entry of the final ranking."""

    index: int
    score: float
    text: str | None = None
    # Long documents: the document was cut to fit the window (TRUNCATE).
    truncated: bool = False
    # How many chunks of it were scored: 1 for a document within the window.
    chunks: int = 1
    # CHUNK, for a document of several chunks: the best chunk, and its text as
    # [start, end) offsets in characters (code points) into the document.
    best_chunk: BestChunk | None = None


@dataclass(frozen=True, slots=True)
class BestChunk:
    """The chunk a chunked document's score came from."""

    index: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class RerankOutcome:
    """The final answer to a RerankRequest, with what the edge records about it."""

    results: list[RankedDocument]
    total_tokens: int
    # The upstream's request id of every backend call made (one per chunk).
    upstream_request_ids: list[str] = field(default_factory=list)
    # The upstream's id when one upstream call answered the whole request: callers then
    # get it as the request id, so they can quote it to the upstream's operator.
    upstream_request_id: str | None = None
    timings: Timings = NO_TIMINGS
    # Where usage.total_tokens came from: see BackendResult.usage_source.
    usage_source: str = "upstream"
    # The request carried an instruct that the model does not take: it was not used.
    instruct_ignored: bool = False
    # The deployments that answered (several when chunks went to different ones).
    deployments: list[str] = field(default_factory=list)
    # What the score cache answered (x-cache), and the tokens of those scores
    # (usage.cached_tokens; not in total_tokens, which the backends scored for this call).
    cache: CacheOutcome = CacheOutcome.OFF
    cached_tokens: int = 0
    # Backend calls made (one per chunk the score cache did not answer whole): what a
    # caller's usage counts as chunks sent.
    backend_calls: int = 1


class DeploymentState(enum.Enum):
    """A deployment's health, as the router, the metrics and ListModels see it."""

    HEALTHY = "healthy"
    EJECTED = "ejected"  # preferred last; still tried when nothing else is left
    DOWN = "down"  # unreachable: refused at once, but for probes


_Shown = TypeVar("_Shown")


def every_state(shown: Mapping[DeploymentState, _Shown]) -> dict[DeploymentState, _Shown]:
    """`shown` (how one output shows each state), checked to cover every state when it is
    made: a state added later cannot go unshown."""
    missing = [state.name for state in DeploymentState if state not in shown]
    if missing:
        raise ValueError(f"no entry for deployment state {', '.join(missing)}")
    return dict(shown)


@dataclass(frozen=True, slots=True)
class DeploymentInfo:
    """One deployment of a route, as ListModels shows it."""

    name: str
    backend: str  # "upstream" or "local"
    format: str  # the upstream's wire format; empty for a local model
    upstream_url: str  # without credentials; empty for a local model
    priority: int
    weight: int
    state: DeploymentState


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served model (a route) and the limits a request must respect."""

    name: str
    max_documents: int
    max_query_tokens: int
    supports_instruct: bool
    backend: str
    # The upstream's wire format and base URL (no credentials); empty for a local model.
    # With several deployments: those of the first one.
    format: str = ""
    upstream_url: str = ""
    deployments: tuple[DeploymentInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field and why."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """A quota a call was refused for (google.rpc.QuotaFailure): whose (`caller:NAME`) and
    which limit, in words."""

    subject: str
    description: str


class FailureKind(enum.Enum):
    """Whether another deployment could answer where this one failed: what decides failover.

    Set where the error is made, by the layer that knows; the router only reads it.
    """

    # Another deployment would fail the same way: the request is wrong, the caller may not
    # make it, or its deadline is spent.
    REQUEST = "request"
    # This deployment cannot answer now (unreachable, down, overloaded, rate-limited, timed
    # out, answering garbage, still loading, its model failed): another one may.
    DEPLOYMENT = "deployment"


_Error = TypeVar("_Error", bound=BaseException)


def _fields_frozen_only(cls: type[_Error]) -> type[_Error]:
    """Refuse assignments to `cls`'s fields only, not to every attribute.

    A frozen dataclass refuses every assignment, but Python still sets an exception's own
    attributes after it is made (a @contextmanager its `__traceback__`, `add_note` its
    `__notes__`): refused, those would replace the error being raised with another.
    """
    fields = frozenset(declared.name for declared in dataclasses.fields(cls))  # type: ignore[arg-type]

    def set_attribute(error: BaseException, name: str, value: object) -> None:
        if name in fields:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        Exception.__setattr__(error, name, value)

    def delete_attribute(error: BaseException, name: str) -> None:
        if name in fields:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        Exception.__delattr__(error, name)

    setattr(cls, "__setattr__", set_attribute)  # noqa: B010 - mypy refuses assigning a method
    setattr(cls, "__delattr__", delete_attribute)  # noqa: B010
    return cls


@_fields_frozen_only
@dataclass(frozen=True, slots=True)
class ServiceError(Exception):
    """An error with the gRPC status a caller should see.

    The status code is gRPC's vocabulary, used here as a plain enumeration: every
    front door maps it (api/grpc/status.py for gRPC).
    `reason` becomes a google.rpc.ErrorInfo, `violations` a google.rpc.BadRequest,
    `retry_after` a google.rpc.RetryInfo, `quota_violations` a google.rpc.QuotaFailure;
    `metadata` goes into ErrorInfo too.

    Immutable: a layer that adds what it knows (its timings, the deployment) raises a copy
    (`with_timings`, `at_deployment`).
    """

    code: grpc.StatusCode
    message: str
    reason: str | None = None
    violations: list[FieldViolation] = field(default_factory=list)
    retry_after: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # The upstream's id of the failed call, when it named one.
    upstream_request_id: str | None = None
    # Where the time went before the call failed (upstream attempts, waits).
    timings: Timings = NO_TIMINGS
    # No connection could be made at all: no request's content causes that.
    unreachable: bool = False
    # The deployment that failed last (set by the router).
    deployment: str | None = None
    # Whether another deployment may answer instead (the safe default: no).
    kind: FailureKind = FailureKind.REQUEST
    # The quotas the call went over (a caller's limits): a google.rpc.QuotaFailure.
    quota_violations: tuple[QuotaViolation, ...] = ()

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def with_timings(self, timings: Timings) -> ServiceError:
        """The same error, saying where the call's time went."""
        return dataclasses.replace(self, timings=timings)

    def at_deployment(self, name: str) -> ServiceError:
        """The same error, naming the deployment that failed."""
        return dataclasses.replace(self, deployment=name)


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
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE, why, reason="BACKEND_NOT_READY", kind=FailureKind.DEPLOYMENT
    )


MOST_LISTED = 10  # names a status lists: it travels in trailers, which clients bound (8 KiB)


def listed(names: list[str], separator: str = ", ", most: int = MOST_LISTED) -> str:
    """Names for a status's message or metadata: the first `most`, then how many more."""
    shown = separator.join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def model_not_found(model: str, served: list[str]) -> ServiceError:
    """NOT_FOUND for a model no route serves, naming the first served ones (ListModels
    lists them all)."""
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"model {echo(model)!r} is not served here; served models: {listed(served)}",
        reason="MODEL_NOT_FOUND",
        metadata={"model": echo(model), "served_models": listed(served, ",")},
    )
