"""The same scenarios against each upstream wire format: a real server in front of a fake
upstream that speaks that format on loopback (dashscope, compatible, cohere, tei, voyage)."""

from __future__ import annotations

import inspect
import json
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.core.chunking import estimate_tokens
from rerank_service.core.domain import DEFAULT_INSTRUCT
from rerank_service.core.qwen3_prompt import upstream_document, upstream_query
from rerank_service.testing.fake_upstream import (
    COHERE_V2_FIELDS,
    COMPATIBLE_PATH,
    NATIVE_PATH,
    TEI_PATH,
    VOYAGE_PATH,
    FakeUpstream,
    Fault,
    expected_ranking,
    fake_logit,
    total_tokens,
)
from tests.conftest import UPSTREAM_KEY, upstream_settings
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, details_of, error_info, expect_error, request, trailing
from tests.support.server import ServerThread

Code = grpc.StatusCode

FORMATS = ["dashscope", "compatible", "cohere", "tei", "voyage"]
# The format each fake speaks: one DashScope fake serves both DashScope paths.
FAKE_FORMAT = {
    "dashscope": "dashscope",
    "compatible": "dashscope",
    "cohere": "cohere",
    "tei": "tei",
    "voyage": "voyage",
}
DEFAULT_PATH = {
    "dashscope": NATIVE_PATH,
    "compatible": COMPATIBLE_PATH,
    "cohere": "/v1/rerank",
    "tei": TEI_PATH,
    "voyage": VOYAGE_PATH,
}
# Formats whose answers carry the upstream's token count (tei's never do).
REPORTS_USAGE = {"dashscope", "compatible", "cohere", "voyage"}

QUERY = "how do rerank models sort documents"
DOCUMENTS = [
    "Quantum computing is a frontier field.",
    "Rerank models sort documents by relevance to a query.",
    "Models of trains.",
    "How do birds fly?",
    "Documents about rerank models and how they sort.",
]
WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum"]


def corpus(count: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k) % 10] for k in range(1 + i % 4)) + f" doc{i}" for i in range(count)]


def estimate(query: str, documents: list[str]) -> int:
    """The service's own count, for an upstream without usage."""
    return len(documents) * estimate_tokens(query) + sum(map(estimate_tokens, documents))


def upstream_error(fmt: str, message: str) -> tuple[int, dict[str, Any]]:
    """A 4xx in the format's own error body shape, and its status."""
    if fmt in ("dashscope", "compatible"):
        return 400, {"code": "InvalidParameter", "message": message, "request_id": "req-upstream-42"}
    if fmt == "cohere":
        return 400, {"id": "req-upstream-42", "message": message}
    if fmt == "tei":  # TEI's validation errors are 413s (its router's ErrorType::Validation)
        return 413, {"error": message, "error_type": "Validation"}
    return 400, {"detail": message}


def server_error(fmt: str, message: str) -> tuple[int, dict[str, Any]]:
    """The format's answer when its model fails, and its status: a 500, but TEI's 424
    (its router's ErrorType::Backend, "Inference failed")."""
    if fmt in ("dashscope", "compatible"):
        return 500, {"code": "InternalError", "message": message, "request_id": "req-upstream-42"}
    if fmt == "cohere":
        return 500, {"id": "req-upstream-42", "message": message}
    if fmt == "tei":
        return 424, {"error": message, "error_type": "Backend"}
    return 500, {"detail": message}


def unavailable(fmt: str, message: str) -> dict[str, Any]:
    """A 503 body in the format's shape (TEI's: its Unhealthy error)."""
    if fmt in ("dashscope", "compatible"):
        return {"code": "ServiceUnavailable", "message": message, "request_id": "req-upstream-42"}
    if fmt == "cohere":
        return {"id": "req-upstream-42", "message": message}
    if fmt == "tei":
        return {"error": message, "error_type": "Unhealthy"}
    return {"detail": message}


def sent_query_and_documents(fmt: str, body: dict[str, Any]) -> tuple[str, list[str]]:
    if fmt == "dashscope":
        return body["input"]["query"], body["input"]["documents"]
    if fmt == "tei":
        return body["query"], body["texts"]
    return body["query"], body["documents"]


def sent_top_n(fmt: str, body: dict[str, Any]) -> Any:
    if fmt == "dashscope":
        return body["parameters"].get("top_n")
    if fmt == "voyage":
        return body.get("top_k")
    return body.get("top_n")


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeUpstream]]:
    models = ("qwen3-rerank", "gte-rerank-v2")
    started = {
        name: FakeUpstream(api_key=UPSTREAM_KEY, models=models, format=name).start()
        for name in ("dashscope", "cohere", "tei", "voyage")
    }
    try:
        yield started
    finally:
        for fake in started.values():
            fake.stop()


@pytest.fixture(params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def fake(fakes: dict[str, FakeUpstream], fmt: str) -> Iterator[FakeUpstream]:
    """The format's fake, cleared and in its default mode for this test."""
    upstream = fakes[FAKE_FORMAT[fmt]]

    def clear() -> None:
        upstream.reset()
        upstream.api_key = UPSTREAM_KEY
        upstream.logits = False
        upstream.usage = True
        upstream.aliases.clear()

    clear()
    yield upstream
    clear()


Serve = Callable[..., ServerThread]


@pytest.fixture
def serve(fake: FakeUpstream, fmt: str, logs: LogCapture) -> Serve:
    """`with serve(**settings) as server:` a live server speaking `fmt` to its fake."""
    return lambda **overrides: ServerThread(upstream_settings(fake, upstream_dialect=fmt, **overrides))


def rerank(server: ServerThread, **fields: Any) -> tuple[rerank_pb2.RerankResponse, dict[str, Any]]:
    values: dict[str, Any] = {"query": QUERY, "documents": DOCUMENTS}
    values.update(fields)
    response, call = server.stub.Rerank.with_call(request(**values), timeout=30)
    return response, dict(call.trailing_metadata())


def ranking_of(response: rerank_pb2.RerankResponse) -> list[tuple[int, float]]:
    return [(r.index, r.relevance_score) for r in response.output.results]


# --- ranking, top_n, usage ----------------------------------------------------------------------


def test_every_document_is_ranked_as_the_upstream_scored_it(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    with serve() as server:
        response, _ = rerank(server)

    assert ranking_of(response) == expected_ranking(QUERY, DOCUMENTS)
    [sent] = fake.requests
    assert sent.path == DEFAULT_PATH[fmt]
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent_query_and_documents(fmt, sent.body) == (QUERY, DOCUMENTS)


def test_top_n_returns_only_the_best_documents_and_is_sent_where_the_format_has_it(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    with serve() as server:
        response, _ = rerank(server, top_n=2, return_documents=True)

    assert ranking_of(response) == expected_ranking(QUERY, DOCUMENTS)[:2]
    assert [r.document.text for r in response.output.results] == [
        DOCUMENTS[index] for index, _ in expected_ranking(QUERY, DOCUMENTS)[:2]
    ]
    # TEI has no top_n: it scores every text and the service cuts.
    assert sent_top_n(fmt, fake.requests[0].body) == (None if fmt == "tei" else 2)


def test_usage_is_the_upstreams_count_or_the_services_estimate(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    with serve() as server:
        response, metadata = rerank(server)

    if fmt in REPORTS_USAGE:
        assert metadata["x-usage-source"] == "upstream"
        assert response.usage.total_tokens == total_tokens(QUERY, DOCUMENTS)
    else:
        assert metadata["x-usage-source"] == "estimate"
        assert response.usage.total_tokens == estimate(QUERY, DOCUMENTS)


@pytest.mark.parametrize("fmt", ["cohere", "voyage"])
def test_an_answer_without_usage_is_counted_by_the_service(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    fake.usage = False  # Cohere's own answer: billed search units, no token count
    with serve() as server:
        response, metadata = rerank(server)

    assert ranking_of(response) == expected_ranking(QUERY, DOCUMENTS)
    assert metadata["x-usage-source"] == "estimate"
    assert response.usage.total_tokens == estimate(QUERY, DOCUMENTS)


# --- errors, retries, the breaker ---------------------------------------------------------------


def test_an_upstream_4xx_is_invalid_argument_with_the_upstreams_message(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    status, body = upstream_error(fmt, "the upstream says no")
    fake.always(Fault(status=status, body=body))
    with serve() as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.INVALID_ARGUMENT
    assert "the upstream says no" in details_of(error)
    info = error_info(error)
    assert info is not None
    assert info.reason == "UPSTREAM_REJECTED_REQUEST"
    assert info.metadata["upstream_status"] == str(status)
    assert len(fake.requests) == 1  # a rejected request is not retried
    if fmt in ("dashscope", "compatible", "cohere"):  # the formats whose errors name the call
        assert info.metadata["upstream_request_id"] == "req-upstream-42"


def test_a_failed_inference_is_unavailable_with_the_upstreams_message(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    """A 500, or TEI's 424: the upstream's fault, not the request's (not retried, as a 500)."""
    status, body = server_error(fmt, "the model crashed")
    fake.always(Fault(status=status, body=body))
    with serve() as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.UNAVAILABLE
    assert "the model crashed" in details_of(error)
    info = error_info(error)
    assert info is not None
    assert info.reason == "UPSTREAM_UNAVAILABLE"
    assert info.metadata["upstream_status"] == str(status)
    assert len(fake.requests) == 1


def test_a_503_is_retried_and_the_next_answer_used(fmt: str, fake: FakeUpstream, serve: Serve) -> None:
    fake.inject(Fault(status=503, body=unavailable(fmt, "overloaded")))
    fake.inject(Fault(status=503, body=unavailable(fmt, "overloaded")))
    with serve(upstream_retry_backoff=0.01) as server:
        response, _ = rerank(server)

    assert ranking_of(response) == expected_ranking(QUERY, DOCUMENTS)
    assert len(fake.requests) == 3
    assert {r.path for r in fake.requests} == {DEFAULT_PATH[fmt]}


def test_an_unreachable_upstream_goes_down_and_is_refused_at_once(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    with serve(upstream_max_attempts=1, upstream_breaker_failures=2, upstream_breaker_cooldown=30) as server:
        fake.go_down()
        for _ in range(2):
            expect_error(lambda: server.stub.Rerank(request(), timeout=10))
        fake.come_back()
        refused = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(refused) == Code.UNAVAILABLE
    info = error_info(refused)
    assert info is not None
    assert info.reason == "UPSTREAM_CIRCUIT_OPEN"
    assert len(fake.requests) == 0  # nothing was sent while it was down


def test_an_upstream_answering_errors_is_still_called(fmt: str, fake: FakeUpstream, serve: Serve) -> None:
    fake.always(Fault(status=503, body=unavailable(fmt, "overloaded")))
    with serve(upstream_max_attempts=1, upstream_breaker_failures=2, upstream_breaker_cooldown=30) as server:
        for _ in range(3):
            expect_error(lambda: server.stub.Rerank(request(), timeout=10))
        fake.always(None)
        response = server.stub.Rerank(request(), timeout=10)

    assert len(response.output.results) == len(request().documents)
    assert len(fake.requests) == 4  # ejected, it is still the route's only deployment: tried


@pytest.mark.parametrize("fmt", [name for name in FORMATS if name != "tei"])  # TEI never reads a name
def test_a_model_the_upstream_does_not_serve_gets_its_own_answer(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    """The fake's real refusal (not an injected one) passes through with its words."""
    with serve(upstream_models=("qwen3-rerank", "retired-model")) as server:
        error = expect_error(lambda: server.stub.Rerank(request(model="retired-model"), timeout=10))

    assert code_of(error) in (Code.NOT_FOUND, Code.INVALID_ARGUMENT)
    assert "retired-model" in details_of(error)


# --- chunking -----------------------------------------------------------------------------------


def test_70_documents_go_in_3_balanced_upstream_calls_of_at_most_32_merged_exactly(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    """TEI's own limit is 32 texts a call; the others are told 32."""
    documents = corpus(70)
    per_call = None if fmt == "tei" else 32
    with serve(upstream_documents_per_call=per_call) as server:
        response, metadata = rerank(server, query="apple cherry mango plum", documents=documents, top_n=10)

    sizes = sorted(len(sent_query_and_documents(fmt, r.body)[1]) for r in fake.requests)
    assert sizes == [22, 24, 24]
    assert ranking_of(response) == expected_ranking("apple cherry mango plum", documents)[:10]
    expected_tokens = (
        total_tokens("apple cherry mango plum", documents)
        if fmt in REPORTS_USAGE
        else estimate("apple cherry mango plum", documents)
    )
    assert response.usage.total_tokens == expected_tokens
    assert metadata["x-usage-source"] == ("upstream" if fmt in REPORTS_USAGE else "estimate")


def test_tei_refuses_more_texts_than_its_batch_with_413_and_its_words(
    fakes: dict[str, FakeUpstream], logs: LogCapture
) -> None:
    fake = fakes["tei"]
    fake.reset()
    with ServerThread(
        upstream_settings(fake, upstream_dialect="tei", upstream_documents_per_call=40)
    ) as server:
        error = expect_error(lambda: server.stub.Rerank(request(documents=corpus(33)), timeout=10))
    fake.reset()

    assert code_of(error) == Code.INVALID_ARGUMENT
    assert "batch size 33 > maximum allowed batch size 32" in details_of(error)
    assert "Validation" in details_of(error)
    info = error_info(error)
    assert info is not None
    assert info.metadata["upstream_status"] == "413"


# --- --upstream-path ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["cohere"])
@pytest.mark.parametrize(("url_path", "path"), [("", "/v2/rerank"), ("/v2", "/rerank")])
def test_cohere_v2_is_not_sent_return_documents_which_it_would_refuse(
    fmt: str, fake: FakeUpstream, serve: Serve, url_path: str, path: str
) -> None:
    """Cohere's v2 API has no such field and refuses one it does not know with 422, as the
    fake's /v2/rerank does: every call failed. The path is --upstream-url's and --upstream-path."""
    with serve(upstream_url=fake.url + url_path, upstream_path=path) as server:
        response, _ = rerank(server, top_n=2)

    assert ranking_of(response) == expected_ranking(QUERY, DOCUMENTS)[:2]
    [sent] = fake.requests
    assert sent.path == "/v2/rerank"
    assert "return_documents" not in sent.body


@pytest.mark.parametrize("fmt", ["cohere"])
@pytest.mark.parametrize("path", [None, "/rerank", "/v3/rerank"])
def test_the_other_cohere_style_servers_are_told_not_to_return_documents(
    fmt: str, fake: FakeUpstream, serve: Serve, path: str | None
) -> None:
    """Jina sends each document's text back unless told not to (at its /v1/rerank, the default)."""
    with serve(upstream_path=path) as server:
        rerank(server)

    assert fake.requests[0].body["return_documents"] is False


def test_upstream_path_overrides_the_formats_own(fmt: str, fake: FakeUpstream, serve: Serve) -> None:
    fake.aliases["/gateway/rerank-v9"] = DEFAULT_PATH[fmt]
    with serve(upstream_path="/gateway/rerank-v9") as server:
        response, _ = rerank(server)

    assert [r.path for r in fake.requests] == ["/gateway/rerank-v9"]
    assert ranking_of(response) == expected_ranking(QUERY, DOCUMENTS)


# --- ListModels ---------------------------------------------------------------------------------

SUPPORTS_INSTRUCT = {
    # (format, prompt template) -> qwen3-rerank's and gte-rerank-v2's supports_instruct
    ("dashscope", "none"): (True, False),
    ("compatible", "none"): (True, False),
    ("cohere", "none"): (False, False),
    ("tei", "none"): (False, False),
    ("voyage", "none"): (False, False),
    ("dashscope", "qwen3"): (True, False),
    ("compatible", "qwen3"): (True, False),
    ("cohere", "qwen3"): (True, True),
    ("tei", "qwen3"): (True, True),
    ("voyage", "qwen3"): (False, False),
}


@pytest.mark.parametrize("template", ["none", "qwen3"])
def test_list_models_names_the_format_the_url_and_instruct_support(
    fmt: str, fake: FakeUpstream, serve: Serve, template: str
) -> None:
    """(A URL with user:password@ is refused at start: test_config.py.)"""
    with serve(upstream_prompt_template=template) as server:
        response = server.stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=5)

    by_name = {model.name: model for model in response.models}
    assert {model.format for model in response.models} == {fmt}
    assert {model.upstream_url for model in response.models} == {fake.url}
    expected = SUPPORTS_INSTRUCT[(fmt, template)]
    assert (by_name["qwen3-rerank"].supports_instruct, by_name["gte-rerank-v2"].supports_instruct) == expected


# --- instruct and the qwen3 prompt template -----------------------------------------------------


def test_instruct_reaches_the_upstream_natively_or_through_the_qwen3_template(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    instruct = "Find passages about ranking."
    with serve(upstream_prompt_template="qwen3") as server:
        response, _ = rerank(server, instruct=instruct)

    # The fake scores the texts inside the template, as the model reads them.
    assert ranking_of(response) == expected_ranking(QUERY, DOCUMENTS)
    body = fake.requests[0].body
    query, documents = sent_query_and_documents(fmt, body)
    if fmt in ("cohere", "tei"):
        assert query == upstream_query(QUERY, instruct)
        assert query.endswith(f"<Instruct>: {instruct}\n<Query>: {QUERY}\n")
        assert documents == [upstream_document(document) for document in DOCUMENTS]
        assert (
            documents[0]
            == f"<Document>: {DOCUMENTS[0]}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        )
    else:
        assert (query, documents) == (QUERY, DOCUMENTS)
    if fmt == "dashscope":
        assert body["parameters"]["instruct"] == instruct
    elif fmt == "compatible":
        assert body["instruct"] == instruct
    else:
        assert "instruct" not in body


@pytest.mark.parametrize("fmt", ["cohere", "tei"])
def test_the_qwen3_template_without_instruct_uses_the_default_instruction(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    with serve(upstream_prompt_template="qwen3") as server:
        rerank(server)

    query, _ = sent_query_and_documents(fmt, fake.requests[0].body)
    assert f"<Instruct>: {DEFAULT_INSTRUCT}\n<Query>: {QUERY}\n" in query


@pytest.mark.parametrize("fmt", ["cohere", "tei", "voyage"])
def test_without_a_template_instruct_is_not_sent_and_the_log_says_so(
    fmt: str, fake: FakeUpstream, serve: Serve, logs: LogCapture
) -> None:
    with serve() as server:
        rerank(server, instruct="Find passages about ranking.")
        [call] = logs.wait_for_calls(1)

    assert sent_query_and_documents(fmt, fake.requests[0].body) == (QUERY, DOCUMENTS)
    assert "Find passages" not in json.dumps(fake.requests[0].body)
    assert call.get("instruct_ignored") is True


# --- the sigmoid score transform ----------------------------------------------------------------


def test_sigmoid_turns_an_upstreams_logits_into_scores(fmt: str, fake: FakeUpstream, serve: Serve) -> None:
    # TEI answers logits when a request asks for raw scores (it has no setting for them), as
    # the fake does: the others are servers started to answer logits.
    fake.logits = fmt != "tei"
    with serve(upstream_score_transform="sigmoid") as server:
        response, _ = rerank(server)

    expected = expected_ranking(QUERY, DOCUMENTS)
    assert [r.index for r in response.output.results] == [index for index, _ in expected]
    for result in response.output.results:
        logit = fake_logit(QUERY, DOCUMENTS[result.index])
        assert result.relevance_score == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-12)


def test_logits_without_the_transform_are_a_malformed_answer(
    fmt: str, fake: FakeUpstream, serve: Serve
) -> None:
    fake.logits = True
    with serve() as server:
        error = expect_error(
            lambda: server.stub.Rerank(request(query=QUERY, documents=DOCUMENTS), timeout=10)
        )

    assert code_of(error) == Code.INTERNAL
    assert "outside [0, 1]" in details_of(error)
    assert trailing(error)["x-request-id"]


# --- the fake's own checks (what other-language suites rely on) ---------------------------------


def post(url: str, body: Any) -> tuple[int, Any]:
    data = json.dumps(body).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {UPSTREAM_KEY}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=5) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as failed:
        content = failed.read()
        if failed.headers.get_content_type() != "application/json":
            return failed.code, content.decode()  # a plain-text refusal
        return failed.code, json.loads(content)


@pytest.mark.parametrize(
    ("fmt", "body", "status", "shape"),
    [
        ("cohere", {"model": "qwen3-rerank", "documents": ["a"]}, 400, {"id", "message"}),
        ("cohere", {"model": "qwen3-rerank", "query": "q", "documents": []}, 422, {"id", "message"}),
        (
            "cohere",
            {"model": "qwen3-rerank", "query": "q", "documents": ["a"], "top_n": "2"},
            400,
            {"id", "message"},
        ),
        ("tei", {"query": "q", "texts": []}, 400, {"error", "error_type"}),
        ("tei", {"query": "q", "texts": ["a"] * 33}, 413, {"error", "error_type"}),
        ("voyage", {"model": "qwen3-rerank", "query": "q"}, 400, {"detail"}),
        ("voyage", {"model": "qwen3-rerank", "query": "q", "documents": ["a"], "top_k": 0}, 400, {"detail"}),
        ("voyage", {"model": "qwen3-rerank", "query": "q", "documents": ["a"] * 1001}, 400, {"detail"}),
    ],
)
def test_the_fake_refuses_a_bad_request_as_the_real_server_does(
    fmt: str, fake: FakeUpstream, body: dict[str, Any], status: int, shape: set[str]
) -> None:
    got_status, answer = post(fake.url + DEFAULT_PATH[fmt], body)

    assert got_status == status
    assert set(answer) == shape


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"query": "q", "texts": []}, 400, "Empty"),
        ({"query": "q", "texts": ["a"] * 33}, 413, "Validation"),
        # Refused by TEI's web framework (axum) before its own checks: 422, in plain text.
        ({"texts": ["a"]}, 422, None),
        ({"query": "q", "texts": ["a"], "raw_scores": "no"}, 422, None),
    ],
)
def test_the_fake_tei_refuses_with_teis_own_status_and_error_type(
    fakes: dict[str, FakeUpstream], body: dict[str, Any], status: int, error_type: str | None
) -> None:
    fake = fakes["tei"]
    got_status, answer = post(fake.url + TEI_PATH, body)
    fake.reset()

    assert got_status == status
    if error_type is None:
        assert answer.startswith("Failed to deserialize the JSON body into the target type: ")
    else:
        assert answer["error_type"] == error_type


def test_the_fake_cohere_v2_refuses_a_field_cohere_v2_does_not_have(fakes: dict[str, FakeUpstream]) -> None:
    """As Cohere does (422 "unknown field"); its v1 path takes return_documents."""
    fake = fakes["cohere"]
    body = {"model": "qwen3-rerank", "query": "q", "documents": ["a"], "top_n": 1}
    plain, _ = post(fake.url + "/v2/rerank", body)
    refused, answer = post(fake.url + "/v2/rerank", {**body, "return_documents": False})
    v1, _ = post(fake.url + "/v1/rerank", {**body, "return_documents": False})
    fake.reset()

    assert (plain, refused, v1) == (200, 422, 200)
    assert set(answer) == {"id", "message"}
    assert answer["message"].startswith("unknown field: parameter 'return_documents' is not a valid field.")


def test_the_fake_cohere_v2_takes_the_fields_coheres_own_sdk_sends() -> None:
    """Cohere's v2 client (the SDK pinned in pyproject.toml) sends no other: no return_documents."""
    from cohere.v2.raw_client import RawV2Client

    sent = set(inspect.signature(RawV2Client.rerank).parameters) - {"self", "request_options"}
    assert sent == COHERE_V2_FIELDS


def test_the_fake_tei_answers_every_text_best_first_and_raw_scores_as_logits(
    fakes: dict[str, FakeUpstream],
) -> None:
    fake = fakes["tei"]
    status, answer = post(fake.url + TEI_PATH, {"query": QUERY, "texts": DOCUMENTS})
    _, raw = post(fake.url + TEI_PATH, {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True})
    fake.reset()

    assert status == 200
    assert [(item["index"], item["score"]) for item in answer] == expected_ranking(QUERY, DOCUMENTS)
    assert [item["score"] for item in raw] == [fake_logit(QUERY, DOCUMENTS[item["index"]]) for item in raw]


@pytest.mark.parametrize("fmt", ["dashscope", "compatible"])
def test_a_model_that_takes_no_instruct_is_not_sent_one(
    fmt: str, fake: FakeUpstream, serve: Serve, logs: LogCapture
) -> None:
    """gte-rerank-v2 takes no instruction (ListModels: supports_instruct false): a caller's is
    left out of the request, as the access log says."""
    served = fake.models
    fake.models = ("gte-rerank-v2",)
    try:
        with serve(upstream_models=("gte-rerank-v2",)) as server:
            rerank(server, model="gte-rerank-v2", instruct="Find passages about ranking.")
            [call] = logs.wait_for_calls(1)
    finally:
        fake.models = served

    assert "Find passages" not in json.dumps(fake.requests[0].body)
    assert call.get("instruct_ignored") is True
