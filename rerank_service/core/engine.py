"""The rerank logic that is the same whichever backend answers.

Validate, pick the model, split the documents into backend-sized chunks, fan the
chunks out (bounded), merge, sort, cut to top_n and attach the document texts. The
engine never sees protobuf or HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple, Protocol, runtime_checkable

from rerank_service.config.server import CallConfig
from rerank_service.core.backend import Backend
from rerank_service.core.chunking import CallLimits, estimate_tokens, fan_out, split, text_bytes
from rerank_service.core.domain import (
    MAX_TOKENS,
    BackendRequest,
    BackendResult,
    CacheOutcome,
    CallContext,
    CallPin,
    FieldViolation,
    ModelInfo,
    RankedDocument,
    RerankOutcome,
    RerankRequest,
    ScoredDocument,
    ServiceError,
    cache_outcome,
    combined,
    invalid_argument,
    model_not_found,
    replaced,
)
from rerank_service.core.long_documents import Plan, plan
from rerank_service.core.long_documents import violations as long_document_violations

# What `RerankEngine.validate` found a request to ask for: its model, and the route's limits.
Validated = tuple[ModelInfo, CallLimits]


@runtime_checkable
class PinsCalls(Protocol):
    """A backend that chooses where each call goes (the router, among its routes)."""

    def pin_call(self, model: str, pin: CallPin) -> CallLimits:
        """`model`'s call limits, read where the call will go: `pin` is filled with that
        choice (held open) for every one of its chunks, whatever a reload changes
        meanwhile, until it is released."""
        ...


class Prepared(NamedTuple):
    """A call the engine has checked and split (`RerankEngine.prepare`), ready to `run`;
    whoever prepared it calls `release` once it ends, run or not."""

    request: RerankRequest  # as the caller sent it
    model: ModelInfo
    parts: Plan | None  # its long documents' parts (None: scored as sent)
    scored: RerankRequest  # what the backends score
    chunks: list[range]  # of scored's documents, one backend call each
    # Where it was split for, and so runs (a backend that pins calls: the router's route).
    pin: CallPin | None = None

    def release(self) -> None:
        """The call ended: what it was pinned to may close (a reload dropped it)."""
        if self.pin is not None:
            self.pin.release()


# --max-chunks-per-call's default.
DEFAULT_MAX_CHUNKS_PER_CALL = 1000
# A call with more characters than this (documents, query and instruct) plans its
# documents in a thread (tokenizing).
PLAN_IN_LOOP_CHARACTERS = 200_000
# usage_source when the upstream counted the tokens and the service cut or chunked the
# documents by its estimate (no tokenizer named for the deployment).
USAGE_UPSTREAM_CHUNKS_ESTIMATED = "upstream-chunks-estimated"


class RerankEngine:
    def __init__(
        self,
        backend: Backend,
        chunk_concurrency: int,
        max_fanout_factor: int,
        max_chunks_per_call: int = DEFAULT_MAX_CHUNKS_PER_CALL,
    ) -> None:
        self._backend = backend
        # The backend, where it pins calls: a call runs where it was split for (the route).
        self._pins = backend if isinstance(backend, PinsCalls) else None
        # Parts of long documents one call may score (--max-chunks-per-call).
        self._max_chunks_per_call = max_chunks_per_call
        # Chunks of one split call in flight at once (--chunk-concurrency).
        self._chunk_concurrency = chunk_concurrency
        # A split call sends upstream at most this many times its own text (--max-fanout-factor).
        self._max_fanout_factor = max_fanout_factor

    @classmethod
    def from_config(cls, backend: Backend, config: CallConfig) -> RerankEngine:
        return cls(backend, config.chunk_concurrency, config.max_fanout_factor, config.max_chunks_per_call)

    def models(self) -> list[ModelInfo]:
        # Asked each time: a local backend learns what its models can do when it loads them.
        return self._backend.models()

    async def rerank(
        self, request: RerankRequest, context: CallContext, validated: Validated | None = None
    ) -> RerankOutcome:
        """Rank `request`'s documents (`prepare`, then `run`); `validated`: what `validate`
        said of it, when the caller validated it first (else it is validated here)."""
        prepared = await self.prepare(request, validated)
        try:
            return await self.run(prepared, context)
        finally:
            prepared.release()

    async def prepare(self, request: RerankRequest, validated: Validated | None = None) -> Prepared:
        """The call as the backends will be sent it: its long documents' parts and its chunks.
        Every refusal the engine makes by itself is made by now (a long document past its
        parts, a split's fan-out), before anything is sent: the pipeline charges a caller's
        limits only for a call that passed it.

        The call is pinned to the route its limits are read from (a backend that pins calls):
        it is split for them, and a reload before it is sent must not send its chunks to a
        route that takes fewer. `validated` is `validate`'s answer in the same step of the
        event loop (no await between: the limits pinned are those it validated against)."""
        model, limits = validated if validated is not None else self.validate(request)
        pin = None
        if self._pins is not None:
            pin = CallPin()
            limits = self._pins.pin_call(model.name, pin)
        try:
            parts = await self._plan(request, limits)
            scored = (
                request if parts is None else parts.scored_request(request, chunked=max(parts.chunks) > 1)
            )
            chunks = split(scored.query, scored.documents, limits)
            if len(chunks) > 1:  # before any chunk goes out
                self._check_fan_out(scored, model, len(chunks))
        except BaseException:
            if pin is not None:
                pin.release()
            raise
        return Prepared(request, model, parts, scored, chunks, pin)

    async def run(self, prepared: Prepared, context: CallContext) -> RerankOutcome:
        """Score a prepared call's chunks and rank them."""
        request, model, parts, scored, chunks, pin = prepared
        if pin is not None:  # every chunk goes where the call was split for
            context = replaced(context, pin=pin)
        if len(chunks) == 1:
            results = [await self._backend.rerank(_backend_request(model, scored, chunks[0]), context)]
        else:
            results = await self._fan_out(model, scored, chunks, context)
        merged = merge(results, chunks)
        upstream_ids = [result.upstream_request_id for result in results if result.upstream_request_id]
        source = usage_source(results)
        if parts is not None and parts.estimated and source == "upstream":
            source = USAGE_UPSTREAM_CHUNKS_ESTIMATED
        backend_calls = sum(result.cache is not CacheOutcome.HIT for result in results)
        return RerankOutcome(
            results=rank(merged, request) if parts is None else parts.rank(merged, request),
            total_tokens=merged.total_tokens,
            upstream_request_ids=upstream_ids,
            # One upstream call (the score cache answering a split call's other chunks): its
            # id names the answer. Several: the edge names the call, and every upstream id
            # travels in x-upstream-request-ids.
            upstream_request_id=upstream_ids[0] if backend_calls == 1 and len(upstream_ids) == 1 else None,
            timings=combined([result.timings for result in results]),
            usage_source=source,
            instruct_ignored=request.instruct is not None and not model.supports_instruct,
            deployments=list(dict.fromkeys(result.deployment for result in results if result.deployment)),
            cache=cache_outcome([result.cache for result in results]),
            # Capped as total_tokens is: the contract's field is an int32.
            cached_tokens=min(sum(result.cached_tokens for result in results), MAX_TOKENS),
            backend_calls=backend_calls,
        )

    async def _fan_out(
        self, model: ModelInfo, request: RerankRequest, chunks: list[range], context: CallContext
    ) -> list[BackendResult]:
        """Run every chunk, at most `chunk_concurrency` at once; the first failure fails the call.
        Every chunk goes where the first went (`CallPin`), whatever a reload changes meanwhile."""
        if context.pin is not None:  # pinned as it was prepared: released by its caller
            return await self._run_chunks(model, request, chunks, context)
        pin = CallPin()
        context = replaced(context, pin=pin)
        try:
            return await self._run_chunks(model, request, chunks, context)
        finally:
            pin.release()

    async def _run_chunks(
        self, model: ModelInfo, request: RerankRequest, chunks: list[range], context: CallContext
    ) -> list[BackendResult]:
        gate = asyncio.Semaphore(self._chunk_concurrency)
        doomed = False

        async def run(chunk: range) -> BackendResult:
            nonlocal doomed
            waiting_since = time.perf_counter()
            async with gate:
                # A chunk that failed has doomed the call: a chunk let through by the slot
                # it freed must not reach the upstream before the TaskGroup cancels it.
                if doomed:
                    raise asyncio.CancelledError
                waited = time.perf_counter() - waiting_since  # the chunk's queue time: a slot
                try:
                    result = await self._backend.rerank(_backend_request(model, request, chunk), context)
                except ServiceError as error:
                    doomed = True
                    # Its time so far, this wait included, goes up with it.
                    raise error.with_timings(error.timings.waited(waited)) from error
                except BaseException:
                    doomed = True
                    raise
                return dataclasses.replace(result, timings=result.timings.waited(waited))

        tasks: list[asyncio.Task[BackendResult]] = []
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(run(chunk)) for chunk in chunks]
        except BaseException as ended:
            # A chunk failed the call (the TaskGroup cancelled the others), or the call was
            # cancelled: what its chunks answered before was billed all the same, so it is
            # kept as spent (metered: pipeline/usage.py).
            if context.attempted is not None:
                context.attempted.spend(_answered(tasks))
            if isinstance(ended, BaseExceptionGroup):
                raise _first_error(ended) from None  # never a partial ranking
            raise
        return [task.result() for task in tasks]

    async def _plan(self, request: RerankRequest, limits: CallLimits) -> Plan | None:
        """The documents as the backends will score them (long_documents), or None: as sent."""
        # The query and instruction count too: the window's room beside them is counted by
        # tokenizing them (a local model's), and a call of a 10 MB query and short documents
        # held the loop, every other call and health check, for as long as that took.
        size = sum(map(len, request.documents)) + len(request.query) + len(request.instruct or "")
        if limits.window is None or size <= PLAN_IN_LOOP_CHARACTERS:
            return plan(request, limits, self._max_chunks_per_call)
        # Tokenizing megabytes takes milliseconds to seconds: off the event loop.
        return await asyncio.to_thread(plan, request, limits, self._max_chunks_per_call)

    def _check_fan_out(self, request: RerankRequest, model: ModelInfo, requests: int) -> None:
        """Refuse a split whose requests would carry more than the factor times the call's text.

        Every chunk carries the whole query (and instruct, where the model takes one): a long
        query with many short documents would turn a small call into many large upstream requests.
        """
        # A model that takes no instruction is not sent it (the backend drops it): not counted.
        instruct = request.instruct if model.supports_instruct else None
        sent = fan_out(request.query, instruct, request.documents, requests)
        factor = self._max_fanout_factor
        if sent.upstream_bytes > factor * sent.call_bytes:
            # Name the larger of what goes with every request.
            field = "instruct" if instruct and text_bytes(instruct) > text_bytes(request.query) else "query"
            raise invalid_argument(
                [
                    FieldViolation(
                        field,
                        f"goes with each of the {requests} upstream requests this call is split into: "
                        f"{sent.upstream_bytes:,} bytes of text in all, over {factor}x the call's "
                        f"{sent.call_bytes:,} (--max-fanout-factor {factor}); send a shorter {field} or "
                        "fewer documents per call",
                    )
                ]
            )

    def validate(self, request: RerankRequest, may_call: Callable[[str], None] | None = None) -> Validated:
        """Check every field and report all violations at once, then resolve the model.

        `may_call(model)` raises when the caller may not call the model. It is asked
        before the model is looked up, so a caller never learns from a NOT_FOUND, or from
        a model's limits, what it may not call; and a request whose fields are wrong is
        INVALID_ARGUMENT whoever sends it."""
        violations = self._field_violations(request)
        if may_call is not None:
            try:
                may_call(request.model)
            except ServiceError:
                if violations:
                    raise invalid_argument(violations) from None
                raise
        served = {model.name: model for model in self._backend.models()}
        model = served.get(request.model)
        if model is not None and len(request.documents) > model.max_documents:
            violations.append(
                FieldViolation(
                    "documents",
                    f"holds {len(request.documents)} documents; model {model.name!r} takes at most "
                    f"{model.max_documents}",
                )
            )
        limits = self._backend.call_limits(model.name) if model is not None else CallLimits()
        if limits.max_query_tokens is not None:
            violations.extend(_long_query(request.query, limits.max_query_tokens))
        if violations:
            raise invalid_argument(violations)
        if model is None:
            raise model_not_found(request.model, list(served))
        return model, limits

    @staticmethod
    def _field_violations(request: RerankRequest) -> list[FieldViolation]:
        """What is wrong with the request whatever model it names."""
        violations: list[FieldViolation] = []
        if not request.model.strip():
            violations.append(FieldViolation("model", "must not be empty"))
        if not request.query.strip():
            violations.append(FieldViolation("query", "must not be empty or only whitespace"))
        if not request.documents:
            violations.append(FieldViolation("documents", "must hold at least one document"))
        violations.extend(_blank_documents(request.documents))
        if request.top_n is not None and request.top_n < 1:
            violations.append(FieldViolation("top_n", f"must be at least 1 when set, got {request.top_n}"))
        violations.extend(long_document_violations(request))
        return violations


# Each blank document is named, up to this many; the rest are counted in one violation.
MAX_DOCUMENT_VIOLATIONS = 20


def _blank_documents(documents: list[str]) -> list[FieldViolation]:
    if all(map(str.strip, documents)):  # the usual case, in one pass in C
        return []
    blank = [index for index, document in enumerate(documents) if not document.strip()]
    violations = [
        FieldViolation(f"documents[{index}]", "must not be empty or only whitespace")
        for index in blank[:MAX_DOCUMENT_VIOLATIONS]
    ]
    if len(blank) > MAX_DOCUMENT_VIOLATIONS:
        violations.append(
            FieldViolation(
                "documents",
                f"{len(blank) - MAX_DOCUMENT_VIOLATIONS} more documents are empty or only whitespace",
            )
        )
    return violations


def _long_query(query: str, max_tokens: int) -> list[FieldViolation]:
    """The query over the route's limit, its tokens estimated (no tokenizer: an upstream's)."""
    tokens = estimate_tokens(query)
    if tokens <= max_tokens:
        return []
    return [
        FieldViolation(
            "query", f"has about {tokens} tokens (one per 3 bytes); at most {max_tokens} are allowed"
        )
    ]


def _backend_request(model: ModelInfo, request: RerankRequest, chunk: range) -> BackendRequest:
    return BackendRequest(
        model=model.name,
        query=request.query,
        documents=request.documents[chunk.start : chunk.stop],
        instruct=request.instruct,
        # Each chunk's own best top_n are enough: the global top_n is among them.
        top_n=request.top_n,
    )


def usage_source(results: list[BackendResult]) -> str:
    """One answer's usage source: an estimate if any chunk's count was estimated; `cache`
    only when every chunk was answered from the score cache (nothing was counted)."""
    if len(results) == 1:
        return results[0].usage_source
    sources = [result.usage_source for result in results]
    if "estimate" in sources:
        return "estimate"
    # Chunks counted both ways (an upstream's and a local fallback's): the first chunk's,
    # the same for every run of the call.
    return next((source for source in sources if source != "cache"), "cache")


def _answered(tasks: list[asyncio.Task[BackendResult]]) -> list[BackendResult]:
    """What the chunks that ended answered."""
    return [
        task.result() for task in tasks if task.done() and not task.cancelled() and task.exception() is None
    ]


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first: BaseException = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


_INDEX_OF, _SCORE_OF = attrgetter("index"), attrgetter("score")


def merge(results: list[BackendResult], chunks: list[range]) -> BackendResult:
    """One result from per-chunk results: indexes back into the caller's list, tokens summed."""
    if len(results) == 1 and chunks[0].start == 0:
        return results[0]
    scores: list[ScoredDocument] = []
    for result, chunk in zip(results, chunks, strict=True):
        if chunk.start == 0:
            scores.extend(result.scores)
        else:
            offset = chunk.start
            scores.extend(ScoredDocument(offset + scored.index, scored.score) for scored in result.scores)
    total = sum(result.total_tokens for result in results)
    return BackendResult(scores=scores, total_tokens=min(total, MAX_TOKENS))


def rank(result: BackendResult, request: RerankRequest) -> list[RankedDocument]:
    """Sort by score (highest first, ties in input order), apply top_n, attach texts."""
    scores = result.scores
    # Two stable sorts on C keys give the order of the key (-score, index) without a
    # tuple and a Python call per document; the sort by index only matters for ties.
    if len(set(map(_SCORE_OF, scores))) == len(scores):
        ordered = sorted(scores, key=_SCORE_OF, reverse=True)
    else:
        ordered = sorted(scores, key=_INDEX_OF)
        ordered.sort(key=_SCORE_OF, reverse=True)
    if request.top_n is not None:
        del ordered[request.top_n :]
    indexes = list(map(_INDEX_OF, ordered))
    texts = map(request.documents.__getitem__, indexes) if request.return_documents else repeat(None)
    return list(map(RankedDocument, indexes, map(_SCORE_OF, ordered), texts))
