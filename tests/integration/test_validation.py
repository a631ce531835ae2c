"""Bad input is INVALID_ARGUMENT (or NOT_FOUND for a model) at once, and never reaches the upstream."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import ServerFactory
from tests.support.rpc import code_of, details_of, expect_error, field_violations, request, trailing
from tests.support.server import ServerThread

INVALID = [
    pytest.param({"model": ""}, "model", id="empty-model"),
    pytest.param({"query": ""}, "query", id="empty-query"),
    pytest.param({"query": " \n\t "}, "query", id="blank-query"),
    pytest.param({"documents": []}, "documents", id="no-documents"),
    pytest.param({"documents": ["fine", ""]}, "documents[1]", id="empty-document"),
    pytest.param({"documents": ["   ", "fine"]}, "documents[0]", id="blank-document"),
    pytest.param({"top_n": 0}, "top_n", id="top-n-zero"),
    pytest.param({"top_n": -3}, "top_n", id="top-n-negative"),
    pytest.param({"documents": ["doc"] * 10_001}, "documents", id="too-many-documents"),
]


@pytest.mark.parametrize(("fields", "field"), INVALID)
def test_invalid_request_is_invalid_argument_naming_the_field_without_calling_upstream(
    server: ServerThread, upstream: FakeUpstream, fields: dict[str, Any], field: str
) -> None:
    error = expect_error(lambda: server.stub.Rerank(request(**fields), timeout=5))

    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error)
    assert field in details_of(error)
    assert upstream.requests == []
    assert trailing(error)["x-request-id"]


def test_every_violation_is_reported_at_once(server: ServerThread) -> None:
    error = expect_error(lambda: server.stub.Rerank(request(model="", query="", top_n=0), timeout=5))

    assert set(field_violations(error)) == {"model", "query", "top_n"}


def test_the_document_limit_follows_the_configured_maximum(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(max_documents=3) as server:
        accepted = server.stub.Rerank(request(documents=["a", "b", "c"]), timeout=5)
        error = expect_error(lambda: server.stub.Rerank(request(documents=["a", "b", "c", "d"]), timeout=5))

    assert len(accepted.output.results) == 3
    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 3" in field_violations(error)["documents"]
    assert len(upstream.requests) == 1


def test_unknown_model_is_not_found_listing_the_served_models(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    error = expect_error(lambda: server.stub.Rerank(request(model="gpt-rerank-9000"), timeout=5))

    assert code_of(error) == grpc.StatusCode.NOT_FOUND
    assert "gpt-rerank-9000" in details_of(error)
    assert "qwen3-rerank" in details_of(error)
    assert "gte-rerank-v2" in details_of(error)
    assert upstream.requests == []


def test_the_server_answers_normally_after_bad_requests(server: ServerThread) -> None:
    for fields, _ in [param.values for param in INVALID]:
        expect_error(lambda fields=fields: server.stub.Rerank(request(**fields), timeout=5))  # type: ignore[misc]

    response = server.stub.Rerank(request(), timeout=5)
    assert [r.index for r in response.output.results] == [0, 1]
