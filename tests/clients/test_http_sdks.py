"""The HTTP front door through SDKs nobody here wrote: `dashscope` and `cohere`, from PyPI
(Infinity's client: tests/clients/test_http_infinity_client.py).

Each SDK is pointed at a live `rerank-service serve --http-port 0` (upstream backend in
front of a fake upstream, caller keys on) by its own base-URL setting, exactly as a user
would, and must read our answers into its typed objects and our errors into its own
error fields and classes. Every ranking, token count and error message is compared with
what the gRPC API of the same server gives for the same input.

The SDKs are dev dependencies (pyproject.toml): a missing one fails the import here,
loudly, rather than skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cohere
import dashscope
import grpc
import httpx
import pytest
from cohere.core.api_error import ApiError
from dashscope.v2 import errors as dashscope_errors
from rerank_client import RerankClient

from rerank_service.testing.fake_upstream import FakeUpstream, expected_ranking, total_tokens
from tests.support.process import ServiceProcess

CALLER_KEY = "http-sdk-suite-key-0123456789"
UPSTREAM_KEY = "http-sdk-suite-upstream-key-0123"
WRONG_KEY = "not-a-key-of-this-service"
MODEL = "qwen3-rerank"
QUERY = "red apple"
DOCUMENTS = ["a red apple", "a car", "apple pie"]
INSTRUCT = "Given a grocery query, rank the products that match it"
# What the fake upstream scores (lexical overlap) and counts, best first.
RANKING = expected_ranking(QUERY, DOCUMENTS)  # [(0, 1.0), (2, 0.5), (1, 0.0)]
TOKENS = total_tokens(QUERY, DOCUMENTS)

Ranked = list[tuple[int, float, str | None]]


@dataclass(frozen=True)
class FrontDoor:
    upstream: FakeUpstream
    grpc_target: str
    http_port: int

    @property
    def origin(self) -> str:
        """What Cohere's SDK takes as its base URL (it adds /v1/rerank or /v2/rerank)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dashscope_base(self) -> str:
        """What DashScope's SDK takes as its base URL (it adds /services/rerank/...)."""
        return f"{self.origin}/api/v1"

    def grpc_client(self, api_key: str = CALLER_KEY) -> RerankClient:
        return RerankClient(self.grpc_target, api_key=api_key, model=MODEL)

    def grpc_error(self, api_key: str = CALLER_KEY, **request: Any) -> grpc.RpcError:
        """The gRPC error the same request gets: its message is the one HTTP must carry."""
        call: dict[str, Any] = {"query": QUERY, "documents": DOCUMENTS, **request}
        with self.grpc_client(api_key) as client, pytest.raises(grpc.RpcError) as caught:
            client.rerank(call.pop("query"), call.pop("documents"), **call)
        return caught.value

    def upstream_body(self, query: str) -> dict[str, Any]:
        """The body the service sent upstream for the call with this (unique) query."""
        found = [
            r.body
            for r in self.upstream.requests
            if isinstance(r.body, dict) and r.body.get("input", {}).get("query") == query
        ]
        assert found, f"no upstream request carried the query {query!r}"
        return found[-1]


@pytest.fixture(scope="module")
def front_door() -> Iterator[FrontDoor]:
    with (
        FakeUpstream(api_key=UPSTREAM_KEY) as upstream,
        ServiceProcess(
            # No score cache: each SDK's call must reach the upstream, whose requests these tests read.
            [
                "--backend",
                "upstream",
                "--upstream-url",
                upstream.url,
                "--http-port",
                "0",
                "--cache-memory-mb",
                "0",
            ],
            env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, "RERANK_API_KEYS": CALLER_KEY},
        ) as service,
    ):
        serving = [event for event in service.events() if event.get("event") == "serving"]
        assert serving, service.output
        http_port = serving[-1].get("http_port")
        assert isinstance(http_port, int), f"the serving line names no http_port: {serving[-1]}"
        yield FrontDoor(upstream, service.target, http_port)
        service.terminate()


@pytest.fixture
def dashscope_v1(front_door: FrontDoor, monkeypatch: pytest.MonkeyPatch) -> FrontDoor:
    """DashScope's 1.x module API, pointed at the service by `dashscope.base_http_api_url`."""
    monkeypatch.setattr(dashscope, "base_http_api_url", front_door.dashscope_base)
    return front_door


def dashscope_client(front_door: FrontDoor, api_key: str = CALLER_KEY, **options: Any) -> dashscope.Client:
    return dashscope.Client(api_key=api_key, base_url=front_door.dashscope_base, max_retries=0, **options)


def grpc_ranking(front_door: FrontDoor, query: str, top_n: int | None, return_documents: bool) -> Ranked:
    with front_door.grpc_client() as client:
        result = client.rerank(
            query, DOCUMENTS, top_n=top_n, return_documents=return_documents, instruct=INSTRUCT
        )
    return [(r.index, r.relevance_score, r.text) for r in result.results]


def expected(top_n: int, return_documents: bool) -> Ranked:
    return [
        (index, score, DOCUMENTS[index] if return_documents else None) for index, score in RANKING[:top_n]
    ]


# --- dashscope: the 1.x module API (dashscope.TextReRank.call) -------------------------------


def test_dashscope_text_rerank_reads_the_ranking_usage_and_request_id(dashscope_v1: FrontDoor) -> None:
    query = "Red apple"  # unique, to find the upstream call; the same words (lower-cased) score the same
    response = dashscope.TextReRank.call(
        model=MODEL,
        query=query,
        documents=DOCUMENTS,
        top_n=2,
        return_documents=True,
        instruct=INSTRUCT,
        api_key=CALLER_KEY,
    )

    assert response.status_code == 200, response
    assert not response.code
    assert not response.message
    # result["document"], not result.document: in this SDK the class attribute `document = None`
    # of its ReRankResult (a dict) shadows the key, so the attribute is None whatever was sent.
    ranked = [
        (result.index, result.relevance_score, result["document"]["text"])
        for result in response.output.results
    ]
    assert ranked == expected(2, return_documents=True)
    assert response.usage.total_tokens == total_tokens(query, DOCUMENTS)
    assert response.request_id
    assert response.headers["x-request-id"] == response.request_id
    # The instruction the SDK sent in `parameters` reached the upstream.
    assert dashscope_v1.upstream_body(query)["parameters"]["instruct"] == INSTRUCT
    # The same ranking as the gRPC API of the same server.
    assert ranked == grpc_ranking(dashscope_v1, query, top_n=2, return_documents=True)


def test_dashscope_text_rerank_without_documents_or_top_n(dashscope_v1: FrontDoor) -> None:
    response = dashscope.TextReRank.call(model=MODEL, query=QUERY, documents=DOCUMENTS, api_key=CALLER_KEY)

    assert response.status_code == 200, response
    ranked = [(r.index, r.relevance_score, r.get("document")) for r in response.output.results]
    assert ranked == expected(len(DOCUMENTS), return_documents=False)
    assert response.usage.total_tokens == TOKENS


def test_dashscope_text_rerank_wrong_key_is_its_401_response(dashscope_v1: FrontDoor) -> None:
    response = dashscope.TextReRank.call(model=MODEL, query=QUERY, documents=DOCUMENTS, api_key=WRONG_KEY)

    assert response.status_code == 401
    assert response.code == "InvalidApiKey"
    assert response.message == dashscope_v1.grpc_error(api_key=WRONG_KEY).details()
    assert response.message == "the bearer key is not accepted"
    assert response.request_id
    assert response.output is None


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"top_n": 0}, id="top_n-0"),
        pytest.param({"query": "   "}, id="blank-query"),
        pytest.param({"documents": ["a red apple", " "]}, id="blank-document"),
    ],
)
def test_dashscope_text_rerank_invalid_request_is_its_400_response(
    dashscope_v1: FrontDoor, change: dict[str, Any]
) -> None:
    arguments: dict[str, Any] = {"model": MODEL, "query": QUERY, "documents": DOCUMENTS, **change}
    response = dashscope.TextReRank.call(api_key=CALLER_KEY, **arguments)

    assert response.status_code == 400
    assert response.code == "InvalidParameter"
    assert response.message == dashscope_v1.grpc_error(**change).details()
    assert response.request_id


def test_dashscope_text_rerank_unknown_model_is_its_404_response(dashscope_v1: FrontDoor) -> None:
    response = dashscope.TextReRank.call(
        model="no-such-model", query=QUERY, documents=DOCUMENTS, api_key=CALLER_KEY
    )

    assert response.status_code == 404
    assert response.code == "Model.NotExist"  # the code the SDK knows (dashscope.v2.errors.ErrorCode)
    assert response.message == dashscope_v1.grpc_error(model="no-such-model").details()
    assert "no-such-model" in response.message


def test_dashscope_http_base_url_environment_variable(front_door: FrontDoor) -> None:
    """DASHSCOPE_HTTP_BASE_URL, read when the SDK is imported: the setting that needs no code."""
    script = (
        "import json, sys, dashscope\n"
        "model, query, documents, key = json.loads(sys.argv[1])\n"
        "r = dashscope.TextReRank.call(model=model, query=query, documents=documents, top_n=1, api_key=key)\n"
        "results = [[x.index, x.relevance_score] for x in r.output.results]\n"
        "print(json.dumps({'status': r.status_code, 'results': results, 'tokens': r.usage.total_tokens}))\n"
    )
    arguments = json.dumps([MODEL, QUERY, DOCUMENTS, CALLER_KEY])
    environment = {**os.environ, "DASHSCOPE_HTTP_BASE_URL": front_door.dashscope_base}
    done = subprocess.run(
        [sys.executable, "-c", script, arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer == {"status": 200, "results": [list(RANKING[0])], "tokens": TOKENS}


# --- dashscope: the 2.0 client API (dashscope.Client(...).rerank.create) ---------------------


def test_dashscope_client_rerank_create_reads_the_typed_response(front_door: FrontDoor) -> None:
    query = "red Apple"
    response = dashscope_client(front_door).rerank.create(
        model=MODEL, query=query, documents=DOCUMENTS, top_n=2, return_documents=True, instruct=INSTRUCT
    )

    assert not response.is_error
    assert response.code is None
    ranked = [
        (r.index, r.relevance_score, r.document.text if r.document is not None else None)
        for r in response.results
    ]
    assert ranked == expected(2, return_documents=True)
    assert response.usage is not None
    assert response.usage.total_tokens == total_tokens(query, DOCUMENTS)
    assert response.request_id
    assert response.headers["x-request-id"] == response.request_id
    assert front_door.upstream_body(query)["parameters"]["instruct"] == INSTRUCT
    assert ranked == grpc_ranking(front_door, query, top_n=2, return_documents=True)


def test_dashscope_client_base_url_environment_variable(
    front_door: FrontDoor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASHSCOPE_BASE_URL", front_door.dashscope_base)
    client = dashscope.Client(api_key=CALLER_KEY, max_retries=0)

    response = client.rerank.create(model=MODEL, query=QUERY, documents=DOCUMENTS)

    assert [(r.index, r.relevance_score) for r in response.results] == RANKING


def test_dashscope_client_wrong_key_raises_its_authentication_error(front_door: FrontDoor) -> None:
    with pytest.raises(dashscope_errors.AuthenticationError) as caught:
        dashscope_client(front_door, WRONG_KEY).rerank.create(model=MODEL, query=QUERY, documents=DOCUMENTS)

    error = caught.value
    assert error.status_code == 401
    assert error.code == "InvalidApiKey"
    assert error.message == front_door.grpc_error(api_key=WRONG_KEY).details()
    assert error.request_id
    assert error.headers["x-request-id"] == error.request_id


def test_dashscope_client_invalid_request_raises_its_bad_request_error(front_door: FrontDoor) -> None:
    with pytest.raises(dashscope_errors.BadRequestError) as caught:
        dashscope_client(front_door).rerank.create(model=MODEL, query=QUERY, documents=DOCUMENTS, top_n=0)

    error = caught.value
    assert error.status_code == 400
    assert error.code == "InvalidParameter"
    assert error.message == front_door.grpc_error(top_n=0).details()
    assert "top_n" in error.message


def test_dashscope_client_unknown_model_raises_its_not_found_error(front_door: FrontDoor) -> None:
    with pytest.raises(dashscope_errors.NotFoundError) as caught:
        dashscope_client(front_door).rerank.create(model="no-such-model", query=QUERY, documents=DOCUMENTS)

    error = caught.value
    assert error.status_code == 404
    assert error.code == dashscope_errors.ErrorCode.MODEL_NOT_EXIST  # the SDK's own name for it
    assert error.message == front_door.grpc_error(model="no-such-model").details()


def test_dashscope_client_without_raising_fills_the_response_fields(front_door: FrontDoor) -> None:
    client = dashscope_client(front_door, WRONG_KEY, raise_on_error=False)

    response = client.rerank.create(model=MODEL, query=QUERY, documents=DOCUMENTS)

    assert response.is_error
    assert response.code == "InvalidApiKey"
    assert response.message == "the bearer key is not accepted"
    assert response.request_id
    assert response.results == []


# --- cohere: Client (v1) and ClientV2 ----------------------------------------------------------


def test_cohere_client_v1_rerank(front_door: FrontDoor) -> None:
    client = cohere.Client(api_key=CALLER_KEY, base_url=front_door.origin)

    response = client.rerank(model=MODEL, query=QUERY, documents=DOCUMENTS, top_n=2, return_documents=True)

    ranked = [
        (r.index, r.relevance_score, r.document.text if r.document is not None else None)
        for r in response.results
    ]
    assert ranked == expected(2, return_documents=True)
    assert response.id
    assert response.meta is not None
    assert response.meta.billed_units is not None
    assert response.meta.billed_units.search_units == 1
    assert ranked == grpc_ranking(front_door, QUERY, top_n=2, return_documents=True)


def test_cohere_client_v1_rerank_documents_as_objects(front_door: FrontDoor) -> None:
    client = cohere.Client(api_key=CALLER_KEY, base_url=front_door.origin)

    response = client.rerank(model=MODEL, query=QUERY, documents=[{"text": text} for text in DOCUMENTS])

    assert [(r.index, r.relevance_score) for r in response.results] == RANKING
    assert all(r.document is None for r in response.results)


def test_cohere_client_v1_returns_document_objects_with_every_field_sent(front_door: FrontDoor) -> None:
    """Cohere's v1 API keeps a document object's other fields in the answer: the SDK read
    only `text` back, the `id` its caller matches results on lost."""
    client = cohere.Client(api_key=CALLER_KEY, base_url=front_door.origin)
    documents = [
        {"text": text, "id": f"doc-{index}", "title": f"title {index}"}
        for index, text in enumerate(DOCUMENTS)
    ]

    response = client.rerank(model=MODEL, query=QUERY, documents=documents, return_documents=True)

    assert [(r.index, r.relevance_score) for r in response.results] == RANKING
    returned = [r.document.dict() if r.document is not None else None for r in response.results]
    assert returned == [documents[r.index] for r in response.results]


def test_cohere_client_v1_rank_fields_other_than_text_is_its_bad_request_not_a_text_ranking(
    front_door: FrontDoor,
) -> None:
    """Cohere ranks object documents on the fields `rank_fields` names: answered 200 on
    `text` alone, the ranking was not what was asked for, and nothing said so."""
    client = cohere.Client(api_key=CALLER_KEY, base_url=front_door.origin)
    documents = [{"text": text, "title": f"title {index}"} for index, text in enumerate(DOCUMENTS)]

    with pytest.raises(cohere.BadRequestError) as caught:
        client.rerank(model=MODEL, query=QUERY, documents=documents, rank_fields=["title", "text"])
    on_text = client.rerank(model=MODEL, query=QUERY, documents=documents, rank_fields=["text"])

    assert caught.value.status_code == 400
    assert "rank_fields" in message_of(caught.value)
    assert [(r.index, r.relevance_score) for r in on_text.results] == RANKING


def test_cohere_client_v2_rerank(front_door: FrontDoor) -> None:
    client = cohere.ClientV2(api_key=CALLER_KEY, base_url=front_door.origin)

    response = client.rerank(model=MODEL, query=QUERY, documents=DOCUMENTS, top_n=2)

    ranked = [(r.index, r.relevance_score, None) for r in response.results]
    assert ranked == expected(2, return_documents=False)
    assert response.id
    assert ranked == grpc_ranking(front_door, QUERY, top_n=2, return_documents=False)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cohere_wrong_key_raises_its_unauthorized_error(front_door: FrontDoor, version: str) -> None:
    client = cohere_client(version, front_door, WRONG_KEY)

    with pytest.raises(cohere.UnauthorizedError) as caught:
        client.rerank(model=MODEL, query=QUERY, documents=DOCUMENTS)

    assert caught.value.status_code == 401
    assert message_of(caught.value) == front_door.grpc_error(api_key=WRONG_KEY).details()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cohere_unknown_model_raises_its_not_found_error(front_door: FrontDoor, version: str) -> None:
    client = cohere_client(version, front_door)

    with pytest.raises(cohere.NotFoundError) as caught:
        client.rerank(model="no-such-model", query=QUERY, documents=DOCUMENTS)

    assert caught.value.status_code == 404
    assert message_of(caught.value) == front_door.grpc_error(model="no-such-model").details()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cohere_invalid_request_raises_its_bad_request_error(front_door: FrontDoor, version: str) -> None:
    client = cohere_client(version, front_door)

    with pytest.raises(cohere.BadRequestError) as caught:
        client.rerank(model=MODEL, query=QUERY, documents=[])

    assert caught.value.status_code == 400
    message = message_of(caught.value)
    assert message == front_door.grpc_error(documents=[]).details()
    assert "documents" in message


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cohere_routes_answer_the_model_and_prompt_tokens_infinity_client_requires(
    front_door: FrontDoor, version: str
) -> None:
    """Infinity's client (tests/clients/test_http_infinity_client.py) reads `model` and
    `usage.prompt_tokens` as required fields, and failed with a KeyError without them."""
    answer = httpx.post(
        f"{front_door.origin}/{version}/rerank",
        json={"model": MODEL, "query": QUERY, "documents": DOCUMENTS},
        headers={"Authorization": f"Bearer {CALLER_KEY}"},
        timeout=30,
        trust_env=False,
    )

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == MODEL
    assert body["usage"] == {"prompt_tokens": TOKENS, "total_tokens": TOKENS}


def cohere_client(version: str, front_door: FrontDoor, api_key: str = CALLER_KEY) -> Any:
    # Any: the two clients' rerank methods differ in signature, not in what is called here.
    if version == "v1":
        return cohere.Client(api_key=api_key, base_url=front_door.origin)
    return cohere.ClientV2(api_key=api_key, base_url=front_door.origin)


def message_of(error: ApiError) -> str:
    """Our message, as the SDK keeps it: the parsed JSON error body."""
    body = error.body
    assert isinstance(body, dict), f"the SDK did not parse the error body as JSON: {body!r}"
    message = body.get("message")
    assert isinstance(message, str), body
    return message
