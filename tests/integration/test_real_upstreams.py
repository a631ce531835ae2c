"""The `cohere` upstream format against a real server nobody here wrote: Infinity.

Infinity (infinity-emb 0.0.78, tests/support/infinity.py) serves a tiny random BERT
cross-encoder on CPU. What it answers to `POST /rerank` with
`{model, query, documents, top_n, return_documents: false}`, as observed:

    200 {"object": "rerank",
         "results": [{"relevance_score": 0.2853..., "index": 1, "document": null}, ...],
         "model": "tiny-cross-encoder",
         "usage": {"prompt_tokens": 156, "total_tokens": 156},
         "id": "infinity-<uuid4>", "created": <unix seconds>}

- results are sorted by score, highest first, cut to top_n; `document` is there as null
  when documents are not asked for;
- scores are in [0, 1]: Infinity applies a sigmoid to a one-label model's logit (unless
  asked for `raw_scores: true`);
- `usage` is always there, prompt_tokens equal to total_tokens; by default it counts
  characters (len(query) + len(document) for each document), not tokens: only
  `--lengths-via-tokenize` makes it count the tokenizer's tokens;
- the rerank path is `/rerank` (`/v1/rerank` is a 404 unless started with `--url-prefix /v1`);
- no API key unless started with `--api-key`: an Authorization header is then ignored;
- an unknown model name is a 400 `{"error": {"message": "Invalid model: Engine for model
  name `x` not found. Available model names are [...]", "type": null, "param": null,
  "code": 400}}`, but only while it serves two models or more: with one, any name is it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import grpc
import httpx
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.pipeline.record import USAGE_SOURCE_KEY
from tests.conftest import ServerFactory
from tests.support.infinity import Infinity
from tests.support.infinity import infinity as infinity  # the module-scoped fixture
from tests.support.rpc import code_of, details_of, error_info, expect_error
from tests.support.server import ServerThread

QUERY = "how long do cats sleep"
DOCUMENTS = [
    "cats sleep most of the day",
    "the stock market fell today",
    "mix the flour with water and let the dough rise",
    "dogs and cats are pets",
    "paris is the capital of france",
    "a python function with a bug",
]
UNKNOWN_MODEL = "no-such-model"


def rerank(server: ServerThread, model: str, **fields: object) -> tuple[rerank_pb2.RerankResponse, grpc.Call]:
    values: dict[str, object] = {"model": model, "query": QUERY, "documents": DOCUMENTS}
    values.update(fields)
    request = rerank_pb2.RerankRequest(**values)  # type: ignore[arg-type]
    response, call = server.stub.Rerank.with_call(request, timeout=30)
    return response, call


def served_by(serve: ServerFactory, infinity: Infinity, *models: str) -> AbstractContextManager[ServerThread]:
    """A service in front of Infinity, in the cohere format at Infinity's path."""
    return serve(
        upstream_url=infinity.url,
        upstream_dialect="cohere",
        upstream_path="/rerank",
        upstream_models=models or (infinity.model,),
    )


def infinity_ranking(infinity: Infinity, top_n: int | None = None) -> list[tuple[int, float]]:
    """(index, score) as Infinity scores the request itself, highest first, ties in input order."""
    answer = infinity.rerank(QUERY, DOCUMENTS)
    scored = [(item["index"], item["relevance_score"]) for item in answer["results"]]
    ranking = sorted(scored, key=lambda pair: (-pair[1], pair[0]))
    return ranking if top_n is None else ranking[:top_n]


def test_infinity_answers_the_cohere_rerank_format(infinity: Infinity) -> None:
    response = httpx.post(
        f"{infinity.url}/rerank",
        json={
            "model": infinity.model,
            "query": QUERY,
            "documents": DOCUMENTS,
            "top_n": 3,
            "return_documents": False,
        },
        timeout=30,
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == infinity.model
    results = body["results"]
    assert len(results) == 3
    for item in results:
        assert set(item) <= {"index", "relevance_score", "document"}
        assert isinstance(item["index"], int)
        assert 0 <= item["index"] < len(DOCUMENTS)
        assert isinstance(item["relevance_score"], float)
        assert 0.0 <= item["relevance_score"] <= 1.0
        assert item.get("document") is None
    scores = [item["relevance_score"] for item in results]
    assert scores == sorted(scores, reverse=True)
    # Usage is reported, in characters by default: query and document lengths, per document.
    characters = sum(len(QUERY) + len(document) for document in DOCUMENTS)
    assert body["usage"] == {"prompt_tokens": characters, "total_tokens": characters}


def test_rerank_returns_every_document_once_in_the_order_of_infinitys_scores(
    serve: ServerFactory, infinity: Infinity
) -> None:
    expected = infinity_ranking(infinity)
    with served_by(serve, infinity) as server:
        response, _ = rerank(server, infinity.model)

    results = response.output.results
    assert sorted(r.index for r in results) == list(range(len(DOCUMENTS)))
    assert all(0.0 <= r.relevance_score <= 1.0 for r in results)
    assert [r.index for r in results] == [index for index, _ in expected]
    assert [r.relevance_score for r in results] == pytest.approx([score for _, score in expected], abs=1e-6)
    # The random model tells these documents apart: the order is the scores', not the input's.
    assert len({round(score, 6) for _, score in expected}) == len(DOCUMENTS)


def test_top_n_returns_only_infinitys_best_documents(serve: ServerFactory, infinity: Infinity) -> None:
    expected = infinity_ranking(infinity, top_n=2)
    with served_by(serve, infinity) as server:
        response, _ = rerank(server, infinity.model, top_n=2, return_documents=True)

    results = response.output.results
    assert [r.index for r in results] == [index for index, _ in expected]
    assert [r.relevance_score for r in results] == pytest.approx([score for _, score in expected], abs=1e-6)
    assert [r.document.text for r in results] == [DOCUMENTS[index] for index, _ in expected]


def test_a_model_infinity_does_not_serve_is_invalid_argument_with_infinitys_message(
    serve: ServerFactory, infinity: Infinity
) -> None:
    # The service lists the name, so only Infinity can say it is unknown.
    with served_by(serve, infinity, infinity.model, UNKNOWN_MODEL) as server:
        error = expect_error(lambda: rerank(server, UNKNOWN_MODEL))
        # The service is still fine for the model Infinity serves.
        response, _ = rerank(server, infinity.model)

    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    details = details_of(error)
    assert details.startswith("upstream answered HTTP 400"), details
    assert f"Invalid model: Engine for model name `{UNKNOWN_MODEL}` not found" in details
    info = error_info(error)
    assert info is not None
    assert info.reason == "UPSTREAM_REJECTED_REQUEST"
    assert info.metadata["upstream_status"] == "400"
    assert len(response.output.results) == len(DOCUMENTS)


def test_usage_is_infinitys_own_count_marked_as_from_the_upstream(
    serve: ServerFactory, infinity: Infinity
) -> None:
    answer = infinity.rerank(QUERY, DOCUMENTS)
    reported = (answer.get("usage") or {}).get("total_tokens")
    with served_by(serve, infinity) as server:
        response, call = rerank(server, infinity.model)

    trailing = dict(call.trailing_metadata() or ())
    assert response.usage.total_tokens > 0
    if reported is not None:  # Infinity 0.0.78 always reports it
        assert trailing[USAGE_SOURCE_KEY] == "upstream"
        assert response.usage.total_tokens == reported
    else:
        assert trailing[USAGE_SOURCE_KEY] == "estimate"
