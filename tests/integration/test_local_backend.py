"""The local backend behind the real server: loading, health, limits, batching, errors.

A deterministic fake model (loaded through LocalBackend's loader hook) keeps these
tests about serving; tests/integration/test_local_models_served.py serves real models.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rerank.v1 import rerank_pb2

from rerank_service.backends.local import LocalBackend, LocalModelSpec
from rerank_service.backends.local.batcher import BatchLimits
from rerank_service.backends.local.scorer import Encoded, Scorer
from rerank_service.config import Settings
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, details_of, expect_error, field_violations, request
from tests.support.server import ServerThread
from tests.support.waiting import wait_until


class WordScorer:
    """Scores a pair by the share of query words in the document; one token per word."""

    kind = "cross-encoder"
    max_length = 16
    device = "cpu"
    dtype = "float32"
    engine = "torch"

    def __init__(self, supports_instruct: bool = False, delay: float = 0.0) -> None:
        self.supports_instruct = supports_instruct
        self.delay = delay
        self.batch_sizes: list[int] = []
        self.instructs: list[str | None] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def encode(self, query: str, documents: Sequence[str], instruct: str | None) -> list[Encoded]:
        self.instructs.append(instruct)
        query_words = {hash(word) % 997 for word in query.split()}
        encoded = []
        for document in documents:
            words = [hash(word) % 997 for word in document.split()][: self.max_length]
            overlap = len(query_words & set(words))
            # The score rides in the ids so the fake's score() needs no lookup table.
            encoded.append(Encoded(input_ids=(overlap, len(query_words), *words), tokens=2 + len(words)))
        return encoded

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        self.batch_sizes.append(len(batch))
        if self.delay:
            time.sleep(self.delay)  # the model's work, not synchronisation
        return [item.input_ids[0] / max(1, item.input_ids[1]) for item in batch]


def local_server(
    scorer: Scorer, gate: threading.Event | None = None, start: bool = True, **limits: float
) -> ServerThread:
    def loader(source: str, device: str, dtype: str) -> Scorer:
        if gate is not None:
            gate.wait(10)
        if source == "missing":
            raise ValueError("no model at 'missing': the directory does not exist")
        return scorer

    backend = LocalBackend(
        [LocalModelSpec("word-model", "fake")],
        device="cpu",
        dtype="auto",
        limits=BatchLimits(**limits),  # type: ignore[arg-type]
        max_documents=100,
        max_query_tokens=20,
        loader=loader,
    )
    return ServerThread(Settings(backend="local"), backend=backend, start=start)


@pytest.fixture
def word_scorer() -> WordScorer:
    return WordScorer()


@pytest.fixture
def server(word_scorer: WordScorer, logs: LogCapture) -> Iterator[ServerThread]:
    with local_server(word_scorer) as running:
        yield running


def rerank(server: ServerThread, **fields: object) -> rerank_pb2.RerankResponse:
    response: rerank_pb2.RerankResponse = server.stub.Rerank(
        request(model="word-model", **fields), timeout=10
    )
    return response


def test_local_model_ranks_documents_and_reports_the_tokens_it_processed(server: ServerThread) -> None:
    documents = ["red car", "a red apple", "green apple pie", "nothing here at all"]
    response = rerank(server, query="red apple", documents=documents, return_documents=True)

    assert [(r.index, r.relevance_score) for r in response.output.results] == [
        (1, 1.0),
        (0, 0.5),
        (2, 0.5),
        (3, 0.0),
    ]
    assert [r.document.text for r in response.output.results] == [documents[i] for i in (1, 0, 2, 3)]
    assert response.usage.total_tokens == sum(2 + len(d.split()) for d in documents)
    assert len(response.request_id) == 32  # made by the service: a local model has none


def test_list_models_reports_the_local_model_and_its_instruct_support(server: ServerThread) -> None:
    response = server.stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=5)

    assert [
        (m.name, m.backend, m.supports_instruct, m.max_documents, m.max_query_tokens) for m in response.models
    ] == [("word-model", "local", False, 100, 20)]


def test_a_query_over_the_token_limit_is_invalid_argument(server: ServerThread) -> None:
    error = expect_error(lambda: rerank(server, query=" ".join(["word"] * 21)))

    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "21 tokens" in field_violations(error)["query"]


def test_instruct_reaches_only_models_that_honour_it(logs: LogCapture) -> None:
    ignoring, honouring = WordScorer(supports_instruct=False), WordScorer(supports_instruct=True)
    with local_server(ignoring) as server:
        rerank(server, instruct="Retrieve semantically similar text.")
    with local_server(honouring) as server:
        rerank(server, instruct="Retrieve semantically similar text.")
        rerank(server)

    assert ignoring.instructs == [None]
    assert honouring.instructs == ["Retrieve semantically similar text.", None]


def test_an_unknown_model_is_not_found(server: ServerThread) -> None:
    error = expect_error(lambda: server.stub.Rerank(request(model="qwen3-rerank"), timeout=5))

    assert code_of(error) == grpc.StatusCode.NOT_FOUND
    assert "word-model" in details_of(error)


def test_concurrent_requests_are_merged_into_shared_batches(logs: LogCapture) -> None:
    scorer = WordScorer(delay=0.05)
    with local_server(scorer, max_batch_size=64, max_wait=0.01) as server, ThreadPoolExecutor(16) as pool:
        futures = [
            pool.submit(rerank, server, query=f"q{i} red", documents=["red", "blue"]) for i in range(32)
        ]
        responses = [future.result() for future in futures]

    assert all([r.index for r in response.output.results] == [0, 1] for response in responses)
    assert sum(scorer.batch_sizes) == 64
    assert max(scorer.batch_sizes) > 2  # pairs of several requests shared a model call


def test_health_answers_while_a_batch_runs(logs: LogCapture) -> None:
    scorer = WordScorer(delay=4.0)
    with local_server(scorer) as server, ThreadPoolExecutor(1) as pool:
        assert server.channel is not None
        slow = pool.submit(rerank, server)
        wait_until(lambda: bool(scorer.batch_sizes), what="the slow call's batch running")
        started = time.perf_counter()
        health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        models = server.stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=5)
        answered_in = time.perf_counter() - started
        assert len(slow.result().output.results) == 2

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert models.models[0].name == "word-model"
    assert answered_in < 2.0  # not queued behind the 4 s batch (a bound, not a timing)


def test_the_deadline_bounds_a_call_waiting_on_the_model(logs: LogCapture) -> None:
    scorer = WordScorer(delay=4.0)
    with local_server(scorer) as server:
        started = time.monotonic()
        error = expect_error(lambda: server.stub.Rerank(request(model="word-model"), timeout=0.5))
        elapsed = time.monotonic() - started

    assert code_of(error) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 2.5  # the client's own deadline
    # The server ended the call at the deadline too, not after the model's 4 s batch.
    [call] = logs.wait_for_calls(1)
    assert call["latency_ms"] < 2500


def test_health_is_not_serving_while_the_model_loads(word_scorer: WordScorer, logs: LogCapture) -> None:
    gate = threading.Event()
    with local_server(word_scorer, gate=gate, start=False) as harness:
        starting = harness.start_until_listening()
        assert harness.channel is not None
        health = health_pb2_grpc.HealthStub(harness.channel)

        loading = health.Check(health_pb2.HealthCheckRequest(service="rerank.v1.RerankService"), timeout=5)
        refused = expect_error(lambda: rerank(harness))
        gate.set()
        starting.result(timeout=10)
        loaded = health.Check(health_pb2.HealthCheckRequest(service="rerank.v1.RerankService"), timeout=5)
        answered = rerank(harness)

    assert loading.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code_of(refused) == grpc.StatusCode.UNAVAILABLE
    assert loaded.status == health_pb2.HealthCheckResponse.SERVING
    assert len(answered.output.results) == 2
    assert any(event["event"] == "model loaded" for event in logs.events())
