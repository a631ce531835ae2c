"""RerankEngine: validation, model resolution, readiness and the final ranking."""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any

import grpc
import pytest

from rerank_service.config import Settings
from rerank_service.config.secret import Secret
from rerank_service.config.server import ServerConfig
from rerank_service.core.backend import Backend
from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CacheOutcome,
    CallContext,
    FieldViolation,
    ModelInfo,
    RankedDocument,
    RerankRequest,
    ScoredDocument,
    ServiceError,
    model_not_found,
    not_ready,
)
from rerank_service.core.engine import PLAN_IN_LOOP_CHARACTERS, RerankEngine, rank, usage_source
from rerank_service.core.readiness import Readiness
from rerank_service.core.token_window import COUNTED_BY_TOKENIZER, SpansMeasure

MODELS = [
    ModelInfo("qwen3-rerank", max_documents=5, max_query_tokens=4000, supports_instruct=True, backend="fake"),
    ModelInfo(
        "gte-rerank-v2", max_documents=2, max_query_tokens=4000, supports_instruct=False, backend="fake"
    ),
]


class FakeBackend:
    """Scores documents with a fixed list (or a function of the request) and records calls."""

    def __init__(
        self,
        scores: list[float] | None = None,
        request_id: str | None = "backend-req-1",
        ready: bool = True,
        total_tokens: int = 11,
        limits: CallLimits | None = None,
    ) -> None:
        self.limits = limits or CallLimits()
        self.scores = scores
        self.request_id = request_id
        self._ready = ready
        self.total_tokens = total_tokens
        self.calls: list[tuple[BackendRequest, CallContext]] = []

    @property
    def readiness(self) -> Readiness:
        return Readiness(self._ready)

    def models(self) -> list[ModelInfo]:
        return list(MODELS)

    def call_limits(self, model: str) -> CallLimits:
        return self.limits

    async def start(self) -> None:
        self._ready = True

    async def close(self) -> None:
        self._ready = False

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        if not self._ready:
            raise not_ready("not started")  # as real backends refuse
        self.calls.append((request, context))
        scores = self.scores if self.scores is not None else [0.5] * len(request.documents)
        return BackendResult(
            scores=[ScoredDocument(index=i, score=s) for i, s in enumerate(scores)],
            total_tokens=self.total_tokens,
            upstream_request_id=self.request_id,
        )


def as_backend(fake: FakeBackend) -> Backend:
    return fake  # type-checks FakeBackend against the Protocol


def make_engine(backend: FakeBackend, **settings: Any) -> RerankEngine:
    """The engine over `backend`, with the settings' defaults but `settings`."""
    return RerankEngine.from_config(
        as_backend(backend), ServerConfig.from_settings(Settings(**settings)).calls
    )


def make_request(
    documents: list[str] | None = None,
    model: str = "qwen3-rerank",
    query: str = "what is reranking?",
    top_n: int | None = None,
    instruct: str | None = None,
    return_documents: bool = False,
) -> RerankRequest:
    return RerankRequest(
        model=model,
        query=query,
        documents=["d0", "d1", "d2"] if documents is None else documents,
        top_n=top_n,
        instruct=instruct,
        return_documents=return_documents,
    )


async def rerank_error(engine: RerankEngine, request: RerankRequest) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await engine.rerank(request, CallContext())
    return caught.value


def fields(error: ServiceError) -> list[str]:
    return [violation.field for violation in error.violations]


# --- validation ---------------------------------------------------------------------------------


async def test_every_violation_is_reported_at_once() -> None:
    backend = FakeBackend()
    engine = make_engine(backend)
    error = await rerank_error(
        engine, make_request(model="", query="", documents=["ok", "", "ok", " "], top_n=0)
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["model", "query", "documents[1]", "documents[3]", "top_n"]
    for name in ("model", "query", "documents[1]", "documents[3]", "top_n"):
        assert f"{name}:" in error.message
    assert backend.calls == []


async def test_a_query_over_the_estimated_token_limit_is_refused_naming_the_query() -> None:
    backend = FakeBackend(limits=CallLimits(max_query_tokens=10))  # no tokenizer: estimated
    engine = make_engine(backend)

    error = await rerank_error(engine, make_request(query="q" * 31))  # 11 tokens at 3 bytes each
    await engine.rerank(make_request(query="q" * 30), CallContext())

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["query"]
    assert "at most 10" in error.violations[0].description
    assert len(backend.calls) == 1  # only the call within the limit


async def test_a_backend_that_counts_with_its_tokenizer_gets_any_query() -> None:
    backend = FakeBackend()  # a local model: its tokenizer counts, the engine does not estimate
    await make_engine(backend).rerank(make_request(query="q" * 100_000), CallContext())

    assert len(backend.calls) == 1


async def test_a_split_sending_over_the_fan_out_factor_upstream_is_refused_before_any_call() -> None:
    # 5 chunks of one document, each with the 100-byte query: 510 bytes for the call's 110.
    request = make_request(query="q" * 100, documents=["d0", "d1", "d2", "d3", "d4"])
    refusing = FakeBackend(limits=CallLimits(max_documents=1))
    allowing = FakeBackend(limits=CallLimits(max_documents=1))

    error = await rerank_error(make_engine(refusing, max_fanout_factor=4), request)
    await make_engine(allowing, max_fanout_factor=5).rerank(request, CallContext())

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["query"]
    assert "5 upstream requests" in error.message
    assert "--max-fanout-factor 4" in error.message
    assert refusing.calls == []
    assert len(allowing.calls) == 5


class ManyDocumentsBackend(FakeBackend):
    """FakeBackend whose gte-rerank-v2 (no instruct) takes enough documents to be split often."""

    def models(self) -> list[ModelInfo]:
        return [dataclasses.replace(model, max_documents=10) for model in MODELS]


async def test_the_fan_out_check_does_not_count_an_instruct_the_model_is_not_sent() -> None:
    # gte-rerank-v2 takes no instruction: it is dropped before the upstream request, so its
    # 10,000 bytes must not count 5 times. The query and documents alone: 15 bytes for the call's 11.
    request = make_request(
        model="gte-rerank-v2", query="q", documents=["d0", "d1", "d2", "d3", "d4"], instruct="i" * 10_000
    )
    backend = ManyDocumentsBackend(limits=CallLimits(max_documents=1))

    outcome = await make_engine(backend, max_fanout_factor=2).rerank(request, CallContext())

    assert len(outcome.results) == 5
    assert len(backend.calls) == 5


async def test_a_fan_out_refused_for_a_long_instruct_names_the_instruct() -> None:
    # qwen3-rerank is sent the instruct with each of the 5 requests: it, not the 1-byte query,
    # takes the split over the factor (515 bytes for the call's 111).
    request = make_request(query="q", documents=["d0", "d1", "d2", "d3", "d4"], instruct="i" * 100)
    backend = FakeBackend(limits=CallLimits(max_documents=1))

    error = await rerank_error(make_engine(backend, max_fanout_factor=4), request)

    assert fields(error) == ["instruct"]
    assert "send a shorter instruct or fewer documents" in error.violations[0].description
    assert backend.calls == []


async def test_an_unsplit_call_is_never_refused_for_its_fan_out() -> None:
    backend = FakeBackend(limits=CallLimits(max_documents=5))
    engine = make_engine(backend, max_fanout_factor=1)
    await engine.rerank(make_request(query="q" * 10_000), CallContext())

    assert len(backend.calls) == 1


class ThreadRecordingWindow:
    """A tokenizer's window that records the thread each room beside a query is counted on."""

    counted_by = COUNTED_BY_TOKENIZER

    def __init__(self) -> None:
        self.counted_on: list[threading.Thread] = []

    def room(self, query: str, instruct: str | None) -> int:
        self.counted_on.append(threading.current_thread())
        return 1000

    def measure(self, text: str) -> SpansMeasure:
        return SpansMeasure(text, [match.start() for match in re.finditer(r"\S+", text)])


@pytest.mark.parametrize("field", ["query", "instruct"])
async def test_a_huge_query_or_instruct_with_short_documents_is_planned_off_the_event_loop(
    field: str,
) -> None:
    """The room beside them is counted by tokenizing them: a 12 MB query with short documents
    was tokenized on the loop, and every other call and health check waited seconds for it."""
    window = ThreadRecordingWindow()
    backend = FakeBackend(limits=CallLimits(window=window))
    huge = "bread " * (PLAN_IN_LOOP_CHARACTERS // 6 + 1)
    request = make_request(query=huge) if field == "query" else make_request(instruct=huge)

    await make_engine(backend).rerank(request, CallContext())

    assert window.counted_on  # the room was asked...
    assert threading.current_thread() not in window.counted_on  # ...never on the loop's thread
    assert len(backend.calls) == 1


async def test_empty_document_list_names_documents() -> None:
    backend = FakeBackend()
    error = await rerank_error(make_engine(backend), make_request(documents=[]))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["documents"]
    assert backend.calls == []


@pytest.mark.parametrize("blank", [" ", "\t\n", "   \u3000"])
async def test_whitespace_only_query_counts_as_empty(blank: str) -> None:
    backend = FakeBackend()
    error = await rerank_error(make_engine(backend), make_request(query=blank))
    assert fields(error) == ["query"]
    assert backend.calls == []


async def test_whitespace_only_model_counts_as_empty() -> None:
    error = await rerank_error(make_engine(FakeBackend()), make_request(model="  "))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["model"]


async def test_whitespace_only_document_counts_as_empty() -> None:
    error = await rerank_error(
        make_engine(FakeBackend()),
        make_request(documents=["a", "\n\t "]),
    )
    assert error.violations == [FieldViolation("documents[1]", "must not be empty or only whitespace")]


@pytest.mark.parametrize("top_n", [0, -1, -100])
async def test_top_n_below_one_is_invalid(top_n: int) -> None:
    error = await rerank_error(make_engine(FakeBackend()), make_request(top_n=top_n))
    assert fields(error) == ["top_n"]
    assert str(top_n) in error.violations[0].description


async def test_too_many_documents_names_documents_and_the_limit() -> None:
    backend = FakeBackend()
    engine = make_engine(backend)
    error = await rerank_error(engine, make_request(model="gte-rerank-v2", documents=["a", "b", "c"]))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["documents"]
    assert "3" in error.violations[0].description
    assert "at most 2" in error.violations[0].description
    assert backend.calls == []


async def test_document_count_at_the_model_limit_is_accepted() -> None:
    backend = FakeBackend()
    outcome = await make_engine(backend).rerank(
        make_request(model="gte-rerank-v2", documents=["a", "b"]), CallContext()
    )
    assert len(outcome.results) == 2
    assert len(backend.calls) == 1


async def test_too_many_documents_is_reported_with_other_violations() -> None:
    error = await rerank_error(
        make_engine(FakeBackend()),
        make_request(model="gte-rerank-v2", query="", documents=["a", "", "c"]),
    )
    assert fields(error) == ["query", "documents[1]", "documents"]


async def test_unknown_model_is_not_found_listing_served_models() -> None:
    backend = FakeBackend()
    error = await rerank_error(make_engine(backend), make_request(model="gpt-rerank"))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "MODEL_NOT_FOUND"
    assert "gpt-rerank" in error.message
    assert "qwen3-rerank" in error.message
    assert "gte-rerank-v2" in error.message
    assert error.metadata == {"model": "gpt-rerank", "served_models": "qwen3-rerank,gte-rerank-v2"}
    assert backend.calls == []


def test_a_model_not_found_names_at_most_ten_served_models() -> None:
    """Its message and metadata travel in trailers, which gRPC clients bound (8 KiB)."""
    served = [f"model-{number:03}-{'x' * 60}" for number in range(300)]

    error = model_not_found("gpt-rerank", served)

    assert error.message.endswith("and 290 more")
    assert error.metadata["served_models"].startswith(",".join(served[:10]))
    assert len(error.message) + len(error.metadata["served_models"]) < 2_000


async def test_invalid_fields_win_over_unknown_model() -> None:
    error = await rerank_error(
        make_engine(FakeBackend()),
        make_request(model="nope", query=""),
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["query"]


async def test_a_not_ready_backends_refusal_reaches_the_caller() -> None:
    backend = FakeBackend(ready=False)
    engine = make_engine(backend)
    error = await rerank_error(engine, make_request())
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "BACKEND_NOT_READY"
    assert backend.calls == []


async def test_invalid_request_is_reported_before_readiness() -> None:
    error = await rerank_error(make_engine(FakeBackend(ready=False)), make_request(query=""))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_engine_lists_the_backend_models() -> None:
    engine = make_engine(FakeBackend())
    assert engine.models() == MODELS


# --- what the backend is asked ------------------------------------------------------------------


async def test_backend_receives_the_request_fields_and_the_call_context() -> None:
    backend = FakeBackend(scores=[0.1, 0.2, 0.3])
    context = CallContext(deadline=123.0, bearer_token=Secret("caller"))
    await make_engine(backend).rerank(
        make_request(top_n=2, instruct="find answers", return_documents=True), context
    )
    assert backend.calls == [
        (
            BackendRequest(
                model="qwen3-rerank",
                query="what is reranking?",
                documents=["d0", "d1", "d2"],
                instruct="find answers",
                top_n=2,
            ),
            context,
        )
    ]


# --- ranking ------------------------------------------------------------------------------------


async def test_results_are_sorted_by_score_descending() -> None:
    backend = FakeBackend(scores=[0.2, 0.9, 0.5])
    outcome = await make_engine(backend).rerank(make_request(), CallContext())
    assert [(r.index, r.score) for r in outcome.results] == [(1, 0.9), (2, 0.5), (0, 0.2)]
    assert outcome.total_tokens == 11


async def test_ties_keep_input_order() -> None:
    backend = FakeBackend(scores=[0.5, 0.7, 0.5, 0.7, 0.5])
    outcome = await make_engine(backend).rerank(
        make_request(documents=["a", "b", "c", "d", "e"]), CallContext()
    )
    assert [r.index for r in outcome.results] == [1, 3, 0, 2, 4]


def test_ties_keep_input_order_even_when_the_backend_lists_them_out_of_order() -> None:
    result = BackendResult(
        scores=[ScoredDocument(2, 0.5), ScoredDocument(0, 0.5), ScoredDocument(1, 0.5)], total_tokens=0
    )
    assert [r.index for r in rank(result, make_request())] == [0, 1, 2]


async def test_top_n_cuts_after_sorting() -> None:
    backend = FakeBackend(scores=[0.1, 0.4, 0.9, 0.3])
    outcome = await make_engine(backend).rerank(
        make_request(documents=["a", "b", "c", "d"], top_n=2), CallContext()
    )
    assert [(r.index, r.score) for r in outcome.results] == [(2, 0.9), (1, 0.4)]


async def test_top_n_larger_than_document_count_returns_all() -> None:
    backend = FakeBackend(scores=[0.1, 0.4, 0.9])
    outcome = await make_engine(backend).rerank(make_request(top_n=50), CallContext())
    assert [r.index for r in outcome.results] == [2, 1, 0]


async def test_return_documents_attaches_texts() -> None:
    backend = FakeBackend(scores=[0.1, 0.9, 0.5])
    outcome = await make_engine(backend).rerank(
        make_request(documents=["zero", "one", "two"], return_documents=True), CallContext()
    )
    assert outcome.results == [
        RankedDocument(1, 0.9, "one"),
        RankedDocument(2, 0.5, "two"),
        RankedDocument(0, 0.1, "zero"),
    ]


async def test_without_return_documents_text_is_none() -> None:
    backend = FakeBackend(scores=[0.1, 0.9, 0.5])
    outcome = await make_engine(backend).rerank(make_request(), CallContext())
    assert [r.text for r in outcome.results] == [None, None, None]


def test_rank_attaches_texts_by_index_for_a_partial_backend_answer() -> None:
    # A backend may answer only the best top_n; texts follow the returned indexes.
    result = BackendResult(scores=[ScoredDocument(2, 0.8), ScoredDocument(0, 0.6)], total_tokens=3)
    ranked = rank(result, make_request(documents=["a", "b", "c"], top_n=2, return_documents=True))
    assert ranked == [RankedDocument(2, 0.8, "c"), RankedDocument(0, 0.6, "a")]


# --- request id ---------------------------------------------------------------------------------


async def test_one_upstream_call_names_the_outcome_with_its_request_id() -> None:
    outcome = await make_engine(FakeBackend(request_id="upstream-42")).rerank(make_request(), CallContext())
    assert outcome.upstream_request_id == "upstream-42"
    assert outcome.upstream_request_ids == ["upstream-42"]


class ChunksOneCached(FakeBackend):
    """A split call's first chunk answered whole by the score cache (no upstream call, no id),
    each other chunk by one upstream call of its own id."""

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        result = await super().rerank(request, context)
        if len(self.calls) == 1:
            return dataclasses.replace(result, upstream_request_id=None, cache=CacheOutcome.HIT)
        return dataclasses.replace(result, upstream_request_id=f"upstream-{len(self.calls)}")


async def test_a_split_call_one_upstream_call_answered_is_named_by_its_id() -> None:
    """HTTP.md: x-request-id is the upstream's own when one upstream call answered: the
    cache answered the other chunks (it was the service's own id)."""
    backend = ChunksOneCached(limits=CallLimits(max_documents=2))
    outcome = await make_engine(backend).rerank(make_request(documents=["a", "b", "c"]), CallContext())
    assert len(backend.calls) == 2  # split: two chunks
    assert outcome.upstream_request_ids == ["upstream-2"]
    assert outcome.upstream_request_id == "upstream-2"


async def test_a_split_call_two_upstream_calls_answered_leaves_the_naming_to_the_edge() -> None:
    backend = FakeBackend(request_id="upstream-42", limits=CallLimits(max_documents=2))
    outcome = await make_engine(backend).rerank(make_request(documents=["a", "b", "c"]), CallContext())
    assert outcome.upstream_request_ids == ["upstream-42", "upstream-42"]
    assert outcome.upstream_request_id is None


@pytest.mark.parametrize("missing", [None, ""])
async def test_an_outcome_without_an_upstream_id_leaves_the_naming_to_the_edge(missing: str | None) -> None:
    outcome = await make_engine(FakeBackend(request_id=missing)).rerank(make_request(), CallContext())
    assert outcome.upstream_request_id is None
    assert outcome.upstream_request_ids == []


async def test_thousands_of_blank_documents_give_a_bounded_error() -> None:
    error = await rerank_error(
        make_engine(FakeBackend()),
        make_request(documents=[" "] * 5000),
    )

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    # 20 named, the rest counted in one, and the count over the model's maximum.
    assert len(error.violations) == 22
    assert "4980 more documents are empty" in error.violations[20].description
    assert len(error.message) < 500


async def test_a_huge_unknown_model_name_is_not_echoed_whole() -> None:
    error = await rerank_error(make_engine(FakeBackend()), make_request(model="m" * 1_000_000))

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert len(error.message) < 300
    assert len(error.metadata["model"]) <= 64


# --- usage source of a split call -------------------------------------------------------------


@pytest.mark.parametrize(
    ("sources", "said"),
    [
        (["cache"], "cache"),
        (["cache", "cache"], "cache"),
        (["cache", "upstream"], "upstream"),  # a chunk all cached counts nothing: the others say
        (["upstream", "cache", "estimate"], "estimate"),
        (["model", "model"], "model"),
        # Counted both ways (an upstream and a local fallback): the first chunk's, whatever
        # the process's hash seed (a set's order decided it).
        (["cache", "upstream", "model"], "upstream"),
        (["model", "upstream"], "model"),
    ],
)
def test_a_split_calls_usage_source_comes_from_the_chunks_that_counted(sources: list[str], said: str) -> None:
    results = [BackendResult([], total_tokens=0, usage_source=source) for source in sources]
    assert usage_source(results) == said
