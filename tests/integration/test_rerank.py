"""Rerank and ListModels end to end: a real server in front of a real fake upstream."""

from __future__ import annotations

import grpc
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.testing.fake_upstream import (
    COMPATIBLE_PATH,
    NATIVE_PATH,
    FakeUpstream,
    expected_ranking,
    total_tokens,
)
from tests.conftest import UPSTREAM_KEY, ServerFactory
from tests.support.server import ServerThread

QUERY = "how do rerank models sort documents"
DOCUMENTS = [
    "Quantum computing is a frontier field.",
    "Rerank models sort documents by relevance to a query.",
    "Models of trains.",
    "How do birds fly?",
    "Documents about rerank models and how they sort.",
]


def rerank(server: ServerThread, **fields: object) -> tuple[rerank_pb2.RerankResponse, grpc.Call]:
    values: dict[str, object] = {"model": "qwen3-rerank", "query": QUERY, "documents": DOCUMENTS}
    values.update(fields)
    request = rerank_pb2.RerankRequest(**values)  # type: ignore[arg-type]
    response, call = server.stub.Rerank.with_call(request, timeout=10)
    return response, call


def test_rerank_returns_every_document_ranked_as_the_upstream_scored_them(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    response, call = rerank(server)

    got = [(r.index, r.relevance_score) for r in response.output.results]
    assert got == expected_ranking(QUERY, DOCUMENTS)
    assert response.usage.total_tokens == total_tokens(QUERY, DOCUMENTS)
    assert all(not r.HasField("document") for r in response.output.results)
    # The request id is the upstream's, and is also sent as x-request-id metadata.
    upstream_request_id = response.request_id
    assert len(upstream_request_id) == 36
    assert ("x-request-id", upstream_request_id) in call.trailing_metadata()
    assert len(upstream.requests) == 1


def test_results_are_sorted_highest_first_with_ties_in_input_order(server: ServerThread) -> None:
    documents = ["apple", "banana", "apple", "cherry apple", "banana"]
    response, _ = rerank(server, query="apple", documents=documents)

    assert [r.index for r in response.output.results] == [0, 2, 3, 1, 4]
    scores = [r.relevance_score for r in response.output.results]
    assert scores == sorted(scores, reverse=True)


def test_top_n_returns_only_the_best_documents(server: ServerThread) -> None:
    response, _ = rerank(server, top_n=2)

    assert [(r.index, r.relevance_score) for r in response.output.results] == expected_ranking(
        QUERY, DOCUMENTS
    )[:2]


def test_top_n_larger_than_the_documents_returns_all_of_them(server: ServerThread) -> None:
    response, _ = rerank(server, top_n=1000)

    assert len(response.output.results) == len(DOCUMENTS)


def test_return_documents_echoes_each_text_at_its_index(server: ServerThread) -> None:
    response, _ = rerank(server, return_documents=True, top_n=3)

    assert len(response.output.results) == 3
    for result in response.output.results:
        assert result.document.text == DOCUMENTS[result.index]


def test_native_dialect_sends_the_hosted_api_body_with_the_service_key(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    rerank(server, top_n=2, instruct="Retrieve semantically similar text.", return_documents=True)

    [sent] = upstream.requests
    assert sent.path == NATIVE_PATH
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.body == {
        "model": "qwen3-rerank",
        "input": {"query": QUERY, "documents": DOCUMENTS},
        # Texts are attached by the service, so the upstream is never asked for them.
        "parameters": {
            "return_documents": False,
            "top_n": 2,
            "instruct": "Retrieve semantically similar text.",
        },
    }


def test_unset_instruct_and_top_n_are_not_sent_upstream(server: ServerThread, upstream: FakeUpstream) -> None:
    rerank(server)

    assert upstream.requests[0].body["parameters"] == {"return_documents": False}


@pytest.mark.parametrize("top_n", [None, 2])
def test_compatible_dialect_gives_the_same_answer_as_native(
    serve: ServerFactory, upstream: FakeUpstream, top_n: int | None
) -> None:
    fields: dict[str, object] = {"return_documents": True}
    if top_n is not None:
        fields["top_n"] = top_n
    with serve(upstream_dialect="dashscope") as native_server:
        native, _ = rerank(native_server, **fields)
    with serve(upstream_dialect="compatible") as compatible_server:
        compatible, _ = rerank(compatible_server, **fields)

    assert list(compatible.output.results) == list(native.output.results)
    assert compatible.usage == native.usage
    assert [r.path for r in upstream.requests] == [NATIVE_PATH, COMPATIBLE_PATH]
    flat = upstream.requests[1].body
    assert flat["query"] == QUERY
    assert flat["documents"] == DOCUMENTS
    assert flat.get("top_n") == top_n
    # The compatible endpoint's `id` becomes the request id.
    assert len(compatible.request_id) == 36


def test_list_models_reports_each_served_model_with_its_limits(serve: ServerFactory) -> None:
    with serve(upstream_models=("qwen3-rerank", "gte-rerank-v2", "my-rerank"), max_documents=300) as server:
        response = server.stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=5)

    by_name = {model.name: model for model in response.models}
    assert list(by_name) == ["qwen3-rerank", "gte-rerank-v2", "my-rerank"]
    assert by_name["qwen3-rerank"].supports_instruct is True
    assert by_name["gte-rerank-v2"].supports_instruct is False
    assert {model.max_documents for model in response.models} == {300}
    assert by_name["qwen3-rerank"].max_query_tokens == 4000
    assert {model.backend for model in response.models} == {"upstream"}


def test_a_model_served_by_name_is_passed_to_the_upstream(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    response, _ = rerank(server, model="gte-rerank-v2")

    assert upstream.requests[0].body["model"] == "gte-rerank-v2"
    assert len(response.output.results) == len(DOCUMENTS)


def test_unicode_texts_survive_the_round_trip(server: ServerThread) -> None:
    documents = ["文本排序模型广泛用于搜索引擎", "量子计算是计算科学的一个前沿领域", "emoji 🚀 text"]
    response, _ = rerank(server, query="文本排序模型", documents=documents, return_documents=True)

    assert sorted(r.document.text for r in response.output.results) == sorted(documents)
