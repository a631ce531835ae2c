"""A Rerank with more documents than one upstream call takes: split, fanned out, merged."""

from __future__ import annotations

import grpc
import httpx

from rerank_service.testing.fake_upstream import FakeUpstream, Fault, expected_ranking, total_tokens
from tests.conftest import ServerFactory
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, details_of, expect_error, field_violations, request, trailing
from tests.support.server import ServerThread
from tests.support.waiting import wait_until

WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum"]
QUERY = "apple cherry mango plum"
# A 100 KB query with 2,000 one-letter documents: a 106 KB call. Every chunk carries the
# whole query, so split it would be 69 upstream requests carrying 6.9 MB.
LONG_QUERY = " ".join(WORDS[i % 10] for i in range(20_000))[:100_000]
ONE_LETTER_DOCUMENTS = [WORDS[i % 10][0] for i in range(2000)]
NATIVE = "/api/v1/services/rerank/text-rerank/text-rerank"


def corpus(count: int) -> list[str]:
    """Documents with many distinct scores and many ties across chunk borders."""
    return [" ".join(WORDS[(i * 7 + k) % 10] for k in range(1 + i % 4)) + f" doc{i}" for i in range(count)]


def test_1234_documents_are_split_into_3_chunks_and_merged_exactly(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    documents = corpus(1234)
    response, call = server.stub.Rerank.with_call(
        request(query=QUERY, documents=documents, return_documents=True), timeout=30
    )

    sent = sorted(len(r.body["input"]["documents"]) for r in upstream.requests)
    assert sent == [410, 412, 412]
    got = [(r.index, r.relevance_score) for r in response.output.results]
    assert got == expected_ranking(QUERY, documents)  # indexes refer to the caller's list
    assert all(r.document.text == documents[r.index] for r in response.output.results)
    assert response.usage.total_tokens == total_tokens(QUERY, documents)
    upstream_ids = str(dict(call.trailing_metadata())["x-upstream-request-ids"]).split(",")
    assert len(upstream_ids) == 3
    assert len(set(upstream_ids)) == 3
    assert response.request_id not in upstream_ids  # the service names a split call itself


def test_top_n_is_applied_after_the_merge(server: ServerThread, upstream: FakeUpstream) -> None:
    documents = corpus(1234)
    response = server.stub.Rerank(request(query=QUERY, documents=documents, top_n=25), timeout=30)

    assert [(r.index, r.relevance_score) for r in response.output.results] == expected_ranking(
        QUERY, documents
    )[:25]
    assert all(r.body["parameters"]["top_n"] == 25 for r in upstream.requests)


def test_a_call_within_one_upstream_request_is_not_split(
    server: ServerThread, upstream: FakeUpstream
) -> None:
    response, call = server.stub.Rerank.with_call(request(documents=corpus(500)), timeout=30)

    assert len(upstream.requests) == 1
    assert dict(call.trailing_metadata())["x-upstream-request-ids"] == response.request_id


def test_a_failing_chunk_fails_the_call_with_its_status(serve: ServerFactory, upstream: FakeUpstream) -> None:
    upstream.inject(Fault(delay=0.05))
    upstream.inject(
        Fault(status=429, body={"code": "Throttling", "message": "slow down"}, headers={"Retry-After": "3"})
    )
    # One chunk at a time, and no retry: the second chunk fails.
    with serve(chunk_concurrency=1, upstream_max_attempts=1) as server:
        error = expect_error(lambda: server.stub.Rerank(request(documents=corpus(1500)), timeout=30))

    assert code_of(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "slow down" in details_of(error)
    assert len(upstream.requests) == 2  # the third chunk was never sent
    assert trailing(error)["x-request-id"]


def test_other_chunks_are_cancelled_when_one_fails(serve: ServerFactory, upstream: FakeUpstream) -> None:
    upstream.inject(Fault(status=500, body={"code": "InternalError", "message": "boom"}))
    upstream.always(Fault(delay=5))
    with serve(chunk_concurrency=4) as server:
        error = expect_error(lambda: server.stub.Rerank(request(documents=corpus(2000)), timeout=30))
        assert code_of(error) == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: len(upstream.abandoned) == 3, timeout=3.0, what="the other chunks abandoned")

    assert len(upstream.abandoned) == 3  # the service hung up on the chunks still waiting


def test_chunks_in_flight_are_bounded(serve: ServerFactory, upstream: FakeUpstream) -> None:
    upstream.always(Fault(delay=0.1))
    with serve(chunk_concurrency=3) as server:
        response = server.stub.Rerank(request(query=QUERY, documents=corpus(5000)), timeout=30)

    assert len(upstream.requests) == 10
    assert upstream.max_in_flight == 3
    assert len(response.output.results) == 5000


def test_more_documents_than_the_service_allows_is_invalid_argument(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(max_documents=2000) as server:
        error = expect_error(lambda: server.stub.Rerank(request(documents=corpus(2001)), timeout=30))

    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert upstream.requests == []


def test_a_query_over_max_query_tokens_is_refused_before_any_upstream_request(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    with serve(http_port=0) as server:
        error = expect_error(
            lambda: server.stub.Rerank(request(query=LONG_QUERY, documents=ONE_LETTER_DOCUMENTS), timeout=30)
        )
        assert server.server is not None
        assert server.server.http is not None
        answer = httpx.post(
            f"http://127.0.0.1:{server.server.http.port}{NATIVE}",
            json={"model": "qwen3-rerank", "input": {"query": LONG_QUERY, "documents": ONE_LETTER_DOCUMENTS}},
            timeout=30,
        )

    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    # No tokenizer for an upstream model: estimated at one token per 3 bytes.
    refusal = "has about 33334 tokens (one per 3 bytes); at most 4000 are allowed"
    assert field_violations(error)["query"] == refusal
    assert answer.status_code == 400
    assert f"query: {refusal}" in answer.json()["message"]
    assert upstream.requests == []


def test_a_call_that_would_send_upstream_over_10x_its_text_is_refused_before_any_upstream_request(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    query = LONG_QUERY[:11_000]  # about 3,667 tokens: within max_query_tokens
    documents = [WORDS[i % 10][0] for i in range(3000)]  # 32 a chunk: 94 chunks, 1 MB upstream
    refused = request(query=query, documents=documents)
    with serve() as server:
        error = expect_error(lambda: server.stub.Rerank(refused, timeout=30))

    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "94 upstream requests" in field_violations(error)["query"]
    assert "--max-fanout-factor 10" in details_of(error)
    assert upstream.requests == []

    with serve(max_fanout_factor=100) as server:
        response = server.stub.Rerank(refused, timeout=30)

    assert len(response.output.results) == 3000
    assert len(upstream.requests) == 94


def test_a_call_split_into_hundreds_of_requests_reaches_a_grpc_client_with_its_ids_bounded(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture
) -> None:
    # 400 upstream requests: their ids, all in the trailer, came to about 15 KB, past the 8 KiB
    # of metadata a gRPC client takes by default: the call succeeded and the client saw
    # RESOURCE_EXHAUSTED.
    documents = corpus(400)
    with serve(upstream_documents_per_call=1, max_fanout_factor=1000) as server:
        response, call = server.stub.Rerank.with_call(request(query="apple", documents=documents), timeout=60)
        [line] = logs.wait_for_calls(1)

    reported = str(dict(call.trailing_metadata())["x-upstream-request-ids"])
    shown, _, more = reported.rpartition(",+")
    assert len(response.output.results) == 400
    assert len(reported) <= 2100
    assert more.endswith(" more")
    assert len(shown.split(",")) + int(more.split()[0]) == 400
    assert len(line["upstream_request_ids"]) == 400  # the access log keeps every one
