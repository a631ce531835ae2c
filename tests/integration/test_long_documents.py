"""Long documents end to end: a real server cuts, chunks or refuses them (docs/LONG_DOCUMENTS.md).

Local models (the bundled one, a tiny cross-encoder) count with their own tokenizers; the
fake upstream is chunked by the service's estimate and answers with its own usage.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.backends.local import backend as local_backend
from rerank_service.backends.local.backend import EngineChoice, ScorerLoader
from rerank_service.backends.local.models import load_scorer
from rerank_service.backends.local.scorer import Scorer
from rerank_service.backends.local.window import ScorerWindow
from rerank_service.config import load_settings
from rerank_service.config.routes import RouteEntry
from rerank_service.config.secret import Secret
from rerank_service.core.chunking import CallLimits, estimate_tokens
from rerank_service.core.domain import LongDocuments, RerankRequest
from rerank_service.core.long_documents import plan
from rerank_service.testing.fake_upstream import FakeUpstream, total_tokens
from tests.conftest import UPSTREAM_KEY, ServerFactory, upstream_settings
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, details_of, expect_error, field_violations, request, trailing
from tests.support.server import ServerThread
from tests.support.tiny_models import WORDS, build_tiny_cross_encoder, build_tiny_qwen3_reranker

TRUNCATE, CHUNK, REJECT = (
    rerank_pb2.LONG_DOCUMENTS_TRUNCATE,
    rerank_pb2.LONG_DOCUMENTS_CHUNK,
    rerank_pb2.LONG_DOCUMENTS_REJECT,
)
FILLER_WORDS = ["search", "engine", "vector", "latency", "river", "climate", "server", "protein", "window"]
ANSWER = "Paris is the capital of France."


def filler(rng: random.Random, sentences: int) -> str:
    return " ".join(f"The {' '.join(rng.choice(FILLER_WORDS) for _ in range(10))}." for _ in range(sentences))


# --- the bundled model and a tiny cross-encoder ----------------------------------------------


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("models") / "cross")


@pytest.fixture
def local(cross_encoder: Path, logs: LogCapture) -> Iterator[ServerThread]:
    settings = load_settings(
        {
            "backend": "local",
            "local_models": f"bundled-model=bundled,tiny-cross={cross_encoder}",
            "device": "cpu",
            "cache_memory_mb": 0,  # usage counts what the model read: nothing from the cache
        },
        env={},
    )
    with ServerThread(settings) as server:
        yield server


def test_the_answer_in_the_last_chunk_ranks_first_with_chunk_and_not_with_truncate(
    local: ServerThread,
) -> None:
    rng = random.Random(3)
    distractor = "Cities in Europe draw many visitors every year. " + filler(rng, 60)
    answering = filler(rng, 60) + " " + ANSWER
    documents = [distractor, answering]
    query = "What is the capital of France?"

    def ranked(mode: int) -> rerank_pb2.RerankResponse:
        asked = request(
            model="bundled-model",
            query=query,
            documents=documents,
            return_documents=True,
            long_documents=mode,
        )
        response: rerank_pb2.RerankResponse = local.stub.Rerank(asked, timeout=60)
        return response

    truncated, chunked = ranked(TRUNCATE), ranked(CHUNK)

    assert [r.index for r in truncated.output.results] == [0, 1]
    assert all(
        r.truncated and r.chunks == 1 and not r.HasField("best_chunk") for r in truncated.output.results
    )
    best = chunked.output.results[0]
    assert best.index == 1
    assert best.chunks > 1
    assert not best.truncated
    assert best.best_chunk.index == best.chunks - 1  # the last chunk
    assert answering[best.best_chunk.start : best.best_chunk.end].endswith(ANSWER)
    assert best.document.text == answering  # the document; the offsets say where the chunk is

    # Usage: the tokens of every chunk the model read, as the model counts them.
    scorer = load_scorer("bundled", "cpu", "float32")
    parts = plan(
        RerankRequest("m", query, documents, long_documents=LongDocuments.CHUNK),
        CallLimits(window=ScorerWindow(scorer)),  # type: ignore[arg-type]
        1000,
    )
    assert parts is not None
    assert chunked.usage.total_tokens == sum(item.tokens for item in scorer.encode(query, parts.parts, None))
    assert all(item.length <= scorer.max_length for item in scorer.encode(query, parts.parts, None))


def test_a_cross_encoder_ranks_each_document_by_its_best_chunk(
    local: ServerThread, cross_encoder: Path
) -> None:
    rng = random.Random(5)
    words = [word for word in WORDS if word.isalpha()]
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(60, 200))) for _ in range(4)]
    query = "bread recipe"
    response = local.stub.Rerank(
        request(model="tiny-cross", query=query, documents=documents, long_documents=CHUNK), timeout=60
    )

    scorer = load_scorer(str(cross_encoder), "cpu", "float32")
    parts = plan(
        RerankRequest("m", query, documents, long_documents=LongDocuments.CHUNK),
        CallLimits(window=ScorerWindow(scorer)),  # type: ignore[arg-type]
        1000,
    )
    assert parts is not None
    assert max(parts.chunks) > 1
    scores = scorer.score(scorer.encode(query, parts.parts, None))
    encoded = scorer.encode(query, parts.parts, None)
    assert all(item.length <= scorer.max_length for item in encoded)  # a chunk and the query fit
    best: dict[int, tuple[float, int]] = {}
    for part, (owner, ordinal) in enumerate(zip(parts.owners, parts.ordinals, strict=True)):
        if owner not in best or scores[part] > best[owner][0]:
            best[owner] = (scores[part], ordinal)
    got = {r.index: (r.best_chunk.index, r.chunks) for r in response.output.results}
    assert got == {owner: (ordinal, parts.chunks[owner]) for owner, (_, ordinal) in best.items()}
    served = {r.index: r.relevance_score for r in response.output.results}
    assert served == pytest.approx({owner: score for owner, (score, _) in best.items()}, abs=1e-5)
    assert [r.index for r in response.output.results] == sorted(best, key=lambda o: (-best[o][0], o))
    assert response.usage.total_tokens == sum(item.tokens for item in encoded)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Its tokenizer makes a token of each newline, as Qwen's byte-level BPE does.
    return build_tiny_qwen3_reranker(tmp_path_factory.mktemp("models") / "qwen3")


@pytest.mark.parametrize("field", ["query", "instruct"])
def test_a_local_qwen3_refuses_a_query_too_long_alike_whether_a_document_starts_with_a_newline(
    qwen3: Path, logs: LogCapture, field: str
) -> None:
    words = [word for word in WORDS if word.isalpha()]
    too_long = " ".join(words[index % len(words)] for index in range(600))  # the window is 512
    asked = {"query": "bread", field: too_long}
    settings = load_settings(
        {"backend": "local", "local_models": f"qwen3={qwen3}", "device": "cpu", "cache_memory_mb": 0}, env={}
    )
    with ServerThread(settings) as server:

        def refusal(documents: list[str]) -> grpc.RpcError:
            asking = request(model="qwen3", documents=documents, **asked)
            return expect_error(lambda: server.stub.Rerank(asking, timeout=60))

        errors = [refusal(documents) for documents in (["\nbread"], ["bread"], ["\n\nbread flour", "water"])]

    # The window left for a document is 1 token; the text after the newline fits it.
    assert [code_of(error) for error in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert [list(field_violations(error)) for error in errors] == [[field]] * 3


@pytest.mark.parametrize(
    ("model", "field"), [("tiny-cross", "query"), ("qwen3", "query"), ("qwen3", "instruct")]
)
def test_reject_refuses_a_query_or_instruct_that_fills_the_window_on_it_not_on_a_document(
    cross_encoder: Path, qwen3: Path, logs: LogCapture, model: str, field: str
) -> None:
    # A 600-word query (or instruct) leaves a document no room in the 512-token window: as
    # TRUNCATE and CHUNK are, REJECT is refused on what fills it, even for a two-word document.
    words = [word for word in WORDS if word.isalpha()]
    too_long = " ".join(words[index % len(words)] for index in range(600))
    asked = {"query": "bread", field: too_long}
    settings = load_settings(
        {
            "backend": "local",
            "local_models": f"tiny-cross={cross_encoder},qwen3={qwen3}",
            "device": "cpu",
            "cache_memory_mb": 0,
        },
        env={},
    )
    with ServerThread(settings) as server:
        errors = [
            expect_error(
                lambda documents=documents: server.stub.Rerank(  # type: ignore[misc]
                    request(model=model, documents=documents, long_documents=REJECT, **asked), timeout=60
                )
            )
            for documents in (["bread flour"], ["bread flour " * 400])
        ]

    assert [code_of(error) for error in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert [list(field_violations(error)) for error in errors] == [[field]] * 2
    assert all(f"send a shorter {field}" in details_of(error) for error in errors)


# --- an upstream, chunked by the estimate ------------------------------------------------------

LONG = " ".join(["pear plum grape"] * 400)  # 6,400 characters: about 2,134 estimated tokens
QUERY = "apple"
WITH_ANSWER = LONG + " apple"


def route(upstream: FakeUpstream, **extra: object) -> RouteEntry:
    entry = RouteEntry.model_validate(
        {
            "name": "qwen3-rerank",
            "deployments": [{"format": "dashscope", "url": upstream.url, "name": "fake"}],
            **extra,
        }
    )
    deployment = entry.deployments[0].model_copy(update={"api_key": Secret(UPSTREAM_KEY)})
    return entry.model_copy(update={"deployments": (deployment,)})


def sent_documents(upstream: FakeUpstream) -> list[str]:
    return [document for recorded in upstream.requests for document in recorded.body["input"]["documents"]]


def test_an_upstream_receives_chunks_within_its_window_and_usage_sums_its_answers(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(models=(route(upstream, long_documents="chunk", max_tokens_per_doc=300),)) as server:
        response, call = server.stub.Rerank.with_call(
            request(query=QUERY, documents=[LONG, WITH_ANSWER], return_documents=True), timeout=30
        )

    sent = sent_documents(upstream)
    assert len(sent) > 2
    assert all(estimate_tokens(document) <= 300 for document in sent)
    first = response.output.results[0]
    assert first.index == 1
    assert first.relevance_score == 1.0
    assert first.best_chunk.index == first.chunks - 1
    assert WITH_ANSWER[first.best_chunk.start : first.best_chunk.end].endswith(" apple")
    reported = sum(total_tokens(QUERY, recorded.body["input"]["documents"]) for recorded in upstream.requests)
    assert response.usage.total_tokens == reported
    assert trailing_metadata(call)["x-usage-source"] == "upstream-chunks-estimated"


def trailing_metadata(call: grpc.Call) -> dict[str, str]:
    return {str(key): str(value) for key, value in call.trailing_metadata() or ()}


def test_reject_names_the_document_over_the_window(serve: ServerFactory, upstream: FakeUpstream) -> None:
    with serve() as server:
        error = expect_error(
            lambda: server.stub.Rerank(
                request(documents=["short", LONG], long_documents=REJECT, max_tokens_per_doc=100), timeout=10
            )
        )
    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error)) == ["documents[1]"]
    assert upstream.requests == []


def test_the_chunks_of_a_call_are_bounded(serve: ServerFactory, upstream: FakeUpstream) -> None:
    with serve(max_chunks_per_call=10) as server:
        error = expect_error(
            lambda: server.stub.Rerank(
                request(documents=[LONG] * 3, long_documents=CHUNK, max_tokens_per_doc=200), timeout=10
            )
        )
    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-chunks-per-call" in details_of(error)
    assert "documents" in field_violations(error)
    assert upstream.requests == []
    assert trailing(error)["x-request-id"]


def test_documents_within_the_window_count_against_the_chunks_of_a_call(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    short = [f"pear number {index}" for index in range(11)]
    with serve(max_chunks_per_call=10) as server:
        error = expect_error(
            lambda: server.stub.Rerank(request(documents=short, long_documents=CHUNK), timeout=10)
        )
        truncated = server.stub.Rerank(request(documents=short, long_documents=TRUNCATE), timeout=10)

    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-chunks-per-call" in field_violations(error)["documents"]
    assert len(truncated.output.results) == 11  # one part a document: not counted
    assert sum(len(recorded.body["input"]["documents"]) for recorded in upstream.requests) == 11


def test_a_stream_item_takes_the_same_options(serve: ServerFactory, upstream: FakeUpstream) -> None:
    with serve() as server:
        items = [
            rerank_pb2.RerankStreamRequest(
                id="a",
                request=request(
                    query=QUERY, documents=[LONG, WITH_ANSWER], long_documents=CHUNK, max_tokens_per_doc=300
                ),
            )
        ]
        answers = list(server.stub.RerankStream(iter(items), timeout=30))
    results = answers[0].response.output.results
    assert results[0].index == 1
    assert results[0].chunks > 1


def test_the_http_formats_take_the_options_and_say_what_was_done(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(http_port=0) as server:
        assert server.server is not None
        assert server.server.http is not None
        base = f"http://127.0.0.1:{server.server.http.port}"
        cohere = httpx.post(
            f"{base}/v2/rerank",
            json={
                "model": "qwen3-rerank",
                "query": QUERY,
                "documents": [LONG, WITH_ANSWER],
                "max_tokens_per_doc": 300,
                "long_documents": "chunk",
            },
            timeout=30,
        )
        native = httpx.post(
            f"{base}/api/v1/services/rerank/text-rerank/text-rerank",
            json={
                "model": "qwen3-rerank",
                "input": {"query": QUERY, "documents": [LONG, "apple"]},
                "parameters": {"max_tokens_per_doc": 300},
            },
            timeout=30,
        )
        wrong = httpx.post(
            f"{base}/v1/rerank",
            json={"model": "qwen3-rerank", "query": QUERY, "documents": ["a"], "long_documents": "split"},
            timeout=30,
        )
    assert cohere.status_code == 200, cohere.text
    first = cohere.json()["results"][0]
    assert first["index"] == 1
    assert first["chunks"] > 1
    assert first["truncated"] is False
    assert WITH_ANSWER[first["best_chunk"]["start"] : first["best_chunk"]["end"]].endswith("apple")
    assert native.status_code == 200, native.text
    results = {r["index"]: r for r in native.json()["output"]["results"]}
    assert results[0]["truncated"] is True
    assert results[0]["chunks"] == 1
    assert "truncated" not in results[1]
    assert "chunks" not in results[1]
    assert wrong.status_code == 400
    assert "long_documents" in wrong.text


def test_an_upstream_that_names_a_tokenizer_is_chunked_by_its_tokens(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    from tokenizers import Tokenizer

    from rerank_service.backends.local.model_files import bundled_model_path

    directory = bundled_model_path()
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()  # its tokenizer.json pads to 128
    entry = route(upstream, long_documents="chunk", max_tokens_per_doc=120)
    deployment = entry.deployments[0].model_copy(update={"tokenizer": str(directory)})
    with serve(models=(entry.model_copy(update={"deployments": (deployment,)}),)) as server:
        response, call = server.stub.Rerank.with_call(
            request(query=QUERY, documents=[LONG, WITH_ANSWER]), timeout=30
        )

    sent = sent_documents(upstream)
    counts = [len(tokenizer.encode(document, add_special_tokens=False).ids) for document in sent]
    assert len(sent) > 2
    assert max(counts) <= 120
    assert max(counts) >= 100
    assert response.output.results[0].index == 1
    assert trailing_metadata(call)["x-usage-source"] == "upstream"


def test_while_a_routes_local_model_loads_documents_are_cut_for_the_upstream_that_serves(
    upstream: FakeUpstream, cross_encoder: Path, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The local model reports no window until it is loaded: its fallback got every document whole.
    gate = threading.Event()
    load_as_configured = local_backend._default_loader

    def held(choice: EngineChoice) -> ScorerLoader:
        load = load_as_configured(choice)

        def loader(source: str, device: str, dtype: str) -> Scorer:
            gate.wait(30)
            return load(source, device, dtype)

        return loader

    monkeypatch.setattr(local_backend, "_default_loader", held)
    upstream_route = route(upstream)
    fallback = upstream_route.deployments[0].model_copy(update={"priority": 1})
    primary = RouteEntry.model_validate(
        {"name": "m", "deployments": [{"format": "local", "name": "local", "source": str(cross_encoder)}]}
    ).deployments[0]
    entry = upstream_route.model_copy(update={"deployments": (primary, fallback)})
    over = f"{LONG} {LONG}"  # 12,801 characters: about 4,267 estimated tokens, over qwen3-rerank's 4,000
    documents = ["pear", over]

    with ServerThread(upstream_settings(upstream, models=(entry,)), start=False) as server:
        starting = server.start_until_listening()
        try:
            error = expect_error(
                lambda: server.stub.Rerank(request(documents=documents, long_documents=REJECT), timeout=10)
            )
            assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
            assert list(field_violations(error)) == ["documents[1]"]
            assert upstream.requests == []

            truncated = server.stub.Rerank(request(documents=documents, long_documents=TRUNCATE), timeout=10)
            assert {r.index: r.truncated for r in truncated.output.results} == {0: False, 1: True}
            assert all(estimate_tokens(document) <= 4000 for document in sent_documents(upstream))

            upstream.reset()
            chunked = server.stub.Rerank(request(documents=documents, long_documents=CHUNK), timeout=10)
            assert {r.index: r.chunks for r in chunked.output.results} == {0: 1, 1: 2}
            assert len(sent_documents(upstream)) == 3
        finally:
            gate.set()
        starting.result(60)

        upstream.reset()
        loaded = server.stub.Rerank(request(documents=documents, long_documents=TRUNCATE), timeout=30)
    # Once loaded, the local model serves, cut for its own window.
    assert upstream.requests == []
    assert {r.index: r.truncated for r in loaded.output.results} == {0: False, 1: True}
