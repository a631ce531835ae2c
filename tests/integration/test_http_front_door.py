"""The HTTP front door against a live server: each rerank route in its own wire format,
answering exactly what gRPC answers for the same content, with the same keys, limits,
status mapping, headers, access log, readiness and drain.

Routes: DashScope native, DashScope OpenAI-compatible, Cohere v1 and v2
(rerank_service/api/http/app.py). The server runs in process (ServerThread, `http_port=0`)
in front of the fake upstream, or on tiny local models, or as a real process for SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.api.http.formats import MAX_DOCUMENT_DEPTH
from rerank_service.api.http.statuses import dashscope_code
from rerank_service.config import load_settings
from rerank_service.config.secret import Secret
from rerank_service.core.domain import model_not_found
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import CALLER_KEY, UPSTREAM_KEY, ServerFactory
from tests.support.logs import LogCapture
from tests.support.process import ServiceProcess
from tests.support.rpc import code_of, details_of, expect_error, request, retry_delay
from tests.support.scrape import scrape, value
from tests.support.server import ServerThread
from tests.support.tiny_models import build_tiny_cross_encoder, build_tiny_qwen3_reranker
from tests.support.waiting import wait_until

NATIVE = "/api/v1/services/rerank/text-rerank/text-rerank"
COMPATIBLE = "/compatible-api/v1/reranks"
ROUTES = {"native": NATIVE, "compatible": COMPATIBLE, "cohere-v1": "/v1/rerank", "cohere-v2": "/v2/rerank"}
DASHSCOPE_ROUTES = ("native", "compatible")
QUERY = "red apple pie"
DOCUMENTS = ["a car", "a red apple", "apple pie with red apple", "red wine"]
INSTRUCT = "Retrieve semantically similar text."
JSON_TYPE = {"Content-Type": "application/json"}
Json = dict[str, Any]
# DashScope's error codes as the service names them (statuses.py: the SDK's names); an
# unknown model has its own, not the plain 404 one.
MODEL_NOT_FOUND = dashscope_code(404, model_not_found("no-such-model", []))


# --- helpers ---------------------------------------------------------------------------------


def http_url(server: ServerThread) -> str:
    assert server.server is not None
    assert server.server.http is not None
    assert server.server.http.port is not None
    return f"http://127.0.0.1:{server.server.http.port}"


def body_for(route: str, query: str = QUERY, documents: list[str] | None = None, **fields: Any) -> Json:
    """A request in the route's format; `fields`: model, top_n, return_documents, instruct."""
    documents = DOCUMENTS if documents is None else documents
    model = fields.pop("model", "qwen3-rerank")
    parameters = {name: value for name, value in fields.items() if value is not None}
    if route == "native":
        return {"model": model, "input": {"query": query, "documents": documents}, "parameters": parameters}
    sent: list[Any] = [{"text": d} for d in documents] if route == "cohere-v2" else list(documents)
    return {"model": model, "query": query, "documents": sent, **parameters}


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def post(
    url: str,
    route: str,
    body: Any = None,
    *,
    key: str | None = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> httpx.Response:
    """POST a JSON body (or raw `content`) to the route ("native", ... or a path)."""
    path = ROUTES.get(route, route)
    raw = json.dumps(body).encode() if content is None else content
    sent = {**JSON_TYPE, **bearer(key), **(headers or {})}
    return httpx.post(url + path, content=raw, headers=sent, timeout=timeout)


def results_of(route: str, body: Json) -> list[tuple[int, float, str | None]]:
    results = body["output"]["results"] if route == "native" else body["results"]
    return [(r["index"], r["relevance_score"], r.get("document", {}).get("text")) for r in results]


def grpc_results(response: rerank_pb2.RerankResponse) -> list[tuple[int, float, str | None]]:
    return [
        (r.index, r.relevance_score, r.document.text if r.HasField("document") else None)
        for r in response.output.results
    ]


def answer_id(route: str, body: Json) -> str:
    return str(body["request_id"] if route == "native" else body["id"])


def assert_error_body(route: str, response: httpx.Response, status: int, code: str | None = None) -> Json:
    """The route's error format, the status, the request id header, and nothing leaked;
    the DashScope formats' `code` is the one statuses.py maps the status to (or `code`)."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    body: Json = response.json()
    request_id = response.headers["x-request-id"]
    if route in DASHSCOPE_ROUTES:
        assert set(body) == {"code", "message", "request_id"}
        assert body["request_id"] == request_id
        assert body["code"] == (code or dashscope_code(status))
    else:
        assert set(body) == {"id", "message"}
        assert body["id"] == request_id
    assert isinstance(body["message"], str)
    assert body["message"]
    return body


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def refuses_connections(port: int) -> bool:
    """Whether nothing listens on `port` (any connection made to find out is closed at once)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def http_server(serve: ServerFactory) -> Iterator[ServerThread]:
    with serve(http_port=0) as running:
        yield running


# --- each route in its format, as gRPC answers ---------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "fields",
    [{"top_n": 2, "return_documents": True, "instruct": INSTRUCT}, {}],
    ids=["top_n+documents+instruct", "defaults"],
)
def test_each_route_answers_in_its_format_what_grpc_answers(
    http_server: ServerThread, upstream: FakeUpstream, route: str, fields: Json
) -> None:
    response = post(http_url(http_server), route, body_for(route, **fields))
    over_grpc = http_server.stub.Rerank(request(query=QUERY, documents=DOCUMENTS, **fields), timeout=10)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if route == "native":
        assert set(body) == {"output", "usage", "request_id"}
    elif route == "compatible":
        assert set(body) == {"id", "object", "model", "results", "usage"}
        assert body["object"] == "list"
        assert body["model"] == "qwen3-rerank"
    else:
        assert set(body) == {"id", "model", "results", "meta", "usage"}  # model: Infinity's client reads it
        assert set(body["meta"]) >= {"api_version", "billed_units"}
    assert results_of(route, body) == grpc_results(over_grpc)
    assert body["usage"]["total_tokens"] == over_grpc.usage.total_tokens > 0
    assert len(results_of(route, body)) == fields.get("top_n", len(DOCUMENTS))
    if fields.get("return_documents"):
        assert all(text == DOCUMENTS[index] for index, _, text in results_of(route, body))
    else:
        assert all(text is None for _, _, text in results_of(route, body))
    assert answer_id(route, body) == response.headers["x-request-id"]
    # The instruct reaches the upstream from HTTP as from gRPC.
    assert len(upstream.requests) == 2
    http_sent, grpc_sent = (json.dumps(r.body) for r in upstream.requests)
    assert (INSTRUCT in http_sent) == (INSTRUCT in grpc_sent) == ("instruct" in fields)


@pytest.mark.parametrize("route", ["cohere-v1", "cohere-v2"])
def test_a_cohere_document_object_comes_back_as_sent_with_return_documents(
    http_server: ServerThread, route: str
) -> None:
    """Cohere's v1 API: "If a document is provided the text field is required and all other
    fields will be preserved in the response". Only its `text` came back; a string still
    comes back as `{"text"}`."""
    sent: list[Any] = [
        {"text": DOCUMENTS[0], "id": "doc-7", "title": "Cars", "url": "https://example.com/7"},
        DOCUMENTS[1],
        {"id": "doc-9", "text": DOCUMENTS[2], "rating": 5, "tags": ["pie"]},
        {"text": DOCUMENTS[3]},
    ]
    body = {"model": "qwen3-rerank", "query": QUERY, "documents": sent}
    returned = post(http_url(http_server), route, {**body, "return_documents": True})
    not_returned = post(http_url(http_server), route, body)

    assert returned.status_code == 200, returned.text
    results = returned.json()["results"]
    assert sorted(result["index"] for result in results) == [0, 1, 2, 3]
    expected = [item if isinstance(item, dict) else {"text": item} for item in sent]
    assert {r["index"]: r["document"] for r in results} == dict(enumerate(expected))
    assert not [r for r in not_returned.json()["results"] if "document" in r]


def nested(depth: int) -> Any:
    """`depth` objects and arrays, alternating, one inside the other."""
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"next": value}
    return value


@pytest.mark.parametrize("route", ["cohere-v1", "cohere-v2"])
def test_a_cohere_document_object_nested_deeper_than_the_bound_is_400_before_any_upstream_call(
    http_server: ServerThread, upstream: FakeUpstream, logs: LogCapture, route: str
) -> None:
    """A document object is returned as sent, and orjson writes 254 levels at most (it reads
    1024): one nested 300 deep was scored upstream, then its answer was a 500 with a
    traceback. Refused before the call, naming the document; at the bound, returned as sent."""
    url = http_url(http_server)
    at_bound = {"text": DOCUMENTS[0], "meta": nested(MAX_DOCUMENT_DEPTH)}
    logs.clear()
    refused = [
        post(
            url,
            route,
            {
                "model": "qwen3-rerank",
                "query": QUERY,
                "documents": [DOCUMENTS[1], {"text": DOCUMENTS[0], "meta": nested(depth)}],
                "return_documents": True,
            },
        )
        for depth in (MAX_DOCUMENT_DEPTH + 1, 300)
    ]
    calls = logs.wait_for_calls(len(refused))

    for response in refused:
        error = assert_error_body(route, response, 400)
        assert "documents[1]" in error["message"]
    assert upstream.requests == []
    assert [call["code"] for call in calls] == ["INVALID_ARGUMENT"] * len(refused)
    assert not [event for event in logs.events() if event.get("level") == "error"]

    body = {
        "model": "qwen3-rerank",
        "query": QUERY,
        "documents": [at_bound, DOCUMENTS[1]],
        "return_documents": True,
    }
    answered = post(url, route, body)

    assert answered.status_code == 200, answered.text
    assert {r["index"]: r["document"] for r in answered.json()["results"]} == {
        0: at_bound,
        1: {"text": DOCUMENTS[1]},
    }


@pytest.mark.parametrize("route", ROUTES)
def test_the_same_bad_content_fails_alike_on_every_route_and_on_grpc(
    http_server: ServerThread, upstream: FakeUpstream, route: str
) -> None:
    url = http_url(http_server)
    blank = post(url, route, body_for(route, query="   "))
    unknown = post(url, route, body_for(route, model="no-such-model"))
    blank_grpc = expect_error(lambda: http_server.stub.Rerank(request(query="   "), timeout=10))
    unknown_grpc = expect_error(lambda: http_server.stub.Rerank(request(model="no-such-model"), timeout=10))

    blank_body = assert_error_body(route, blank, 400)
    unknown_body = assert_error_body(route, unknown, 404, MODEL_NOT_FOUND)
    assert dashscope_code(404) != MODEL_NOT_FOUND  # an unknown model, not an unknown path
    assert code_of(blank_grpc) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(unknown_grpc) == grpc.StatusCode.NOT_FOUND
    assert blank_body["message"] == details_of(blank_grpc)
    assert "query" in blank_body["message"]
    assert unknown_body["message"] == details_of(unknown_grpc)
    assert "no-such-model" in unknown_body["message"]
    assert upstream.requests == []


# --- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_a_call_needs_an_accepted_key_on_every_route(
    serve: ServerFactory, upstream: FakeUpstream, route: str
) -> None:
    with serve(http_port=0, api_keys=(Secret(CALLER_KEY),)) as server:
        url = http_url(server)
        missing = post(url, route, body_for(route))
        wrong = post(url, route, body_for(route), key="wrong-key")
        basic = post(url, route, body_for(route), headers={"Authorization": f"Basic {CALLER_KEY}"})
        allowed = post(url, route, body_for(route), key=CALLER_KEY)

    for refused in (missing, wrong, basic):
        assert_error_body(route, refused, 401)
        assert CALLER_KEY not in refused.text
    assert "Bearer" in missing.json()["message"]
    assert allowed.status_code == 200, allowed.text
    assert len(upstream.requests) == 1
    assert upstream.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize("route", ROUTES)
def test_pass_through_sends_the_callers_bearer_upstream(
    serve: ServerFactory, upstream: FakeUpstream, route: str
) -> None:
    with serve(http_port=0, upstream_api_key=None) as server:
        url = http_url(server)
        allowed = post(url, route, body_for(route), key=UPSTREAM_KEY)
        missing = post(url, route, body_for(route))
        refused_upstream = post(url, route, body_for(route), key="not-the-key")

    assert allowed.status_code == 200, allowed.text
    assert upstream.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert_error_body(route, missing, 401)
    assert_error_body(route, refused_upstream, 401)
    assert len(upstream.requests) == 2  # the call without a token never went upstream
    assert upstream.requests[1].headers["authorization"] == "Bearer not-the-key"


def test_models_needs_a_key_and_health_does_not(serve: ServerFactory) -> None:
    with serve(http_port=0, api_keys=(Secret(CALLER_KEY),)) as server:
        url = http_url(server)
        without = httpx.get(url + "/v1/models", timeout=5)
        wrong = httpx.get(url + "/v1/models", headers=bearer("wrong-key"), timeout=5)
        allowed = httpx.get(url + "/v1/models", headers=bearer(CALLER_KEY), timeout=5)
        health = httpx.get(url + "/healthz", timeout=5)
        ready = httpx.get(url + "/readyz", timeout=5)
        document = httpx.get(url + "/openapi.json", timeout=5)

    assert without.status_code == wrong.status_code == 401
    assert allowed.status_code == 200
    assert [model["id"] for model in allowed.json()["data"]] == ["qwen3-rerank", "gte-rerank-v2"]
    assert health.status_code == ready.status_code == document.status_code == 200
    assert health.json() == {"status": "ok"}
    assert ready.json() == {"status": "ready"}
    assert set(document.json()["paths"]) >= set(ROUTES.values())


def test_models_lists_what_grpc_list_models_lists(http_server: ServerThread) -> None:
    listed = httpx.get(http_url(http_server) + "/v1/models", timeout=5).json()
    over_grpc = http_server.stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=5).models

    assert listed["object"] == "list"
    assert [
        (m["id"], m["max_documents"], m["max_query_tokens"], m["supports_instruct"], m["backend"])
        for m in listed["data"]
    ] == [(m.name, m.max_documents, m.max_query_tokens, m.supports_instruct, m.backend) for m in over_grpc]
    assert [[d["name"] for d in m["deployments"]] for m in listed["data"]] == [
        [d.name for d in m.deployments] for m in over_grpc
    ]


# --- status mapping ------------------------------------------------------------------------------

# (case, body, field named in the message), for the flat formats; native puts query and
# documents under `input.` and the rest under `parameters.`.
FLAT_BAD_BODIES: list[tuple[str, Any, str]] = [
    ("query-number", {"model": "qwen3-rerank", "query": 5, "documents": ["a"]}, "query"),
    ("documents-string", {"model": "qwen3-rerank", "query": "q", "documents": "a"}, "documents"),
    ("document-number", {"model": "qwen3-rerank", "query": "q", "documents": ["a", 7]}, "documents[1]"),
    ("top_n-string", {"model": "qwen3-rerank", "query": "q", "documents": ["a"], "top_n": "2"}, "top_n"),
    ("top_n-fraction", {"model": "qwen3-rerank", "query": "q", "documents": ["a"], "top_n": 1.5}, "top_n"),
    ("top_n-zero", {"model": "qwen3-rerank", "query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    (
        "return_documents-string",
        {"model": "qwen3-rerank", "query": "q", "documents": ["a"], "return_documents": "yes"},
        "return_documents",
    ),
    (
        "instruct-list",
        {"model": "qwen3-rerank", "query": "q", "documents": ["a"], "instruct": []},
        "instruct",
    ),
    ("model-missing", {"query": "q", "documents": ["a"]}, "model"),
    ("query-empty", {"model": "qwen3-rerank", "query": "", "documents": ["a"]}, "query"),
    ("documents-empty", {"model": "qwen3-rerank", "query": "q", "documents": []}, "documents"),
    ("document-blank", {"model": "qwen3-rerank", "query": "q", "documents": ["a", " "]}, "documents[1]"),
    ("not-an-object", ["q", "a"], "body"),
]
NATIVE_BAD_BODIES: list[tuple[str, Any, str]] = [
    # An option beside input, where the flat formats put it: ignored, it changed the ranking
    # silently (a top-level instruct).
    (
        "instruct-top-level",
        {"model": "qwen3-rerank", "input": {"query": "q", "documents": ["a"]}, "instruct": "Given a query"},
        "parameters.instruct",
    ),
    (
        "top_n-top-level",
        {"model": "qwen3-rerank", "input": {"query": "q", "documents": ["a"]}, "top_n": 1},
        "parameters.top_n",
    ),
    ("query-number", {"model": "qwen3-rerank", "input": {"query": 5, "documents": ["a"]}}, "input.query"),
    ("input-string", {"model": "qwen3-rerank", "input": "q"}, "input"),
    (
        "top_n-string",
        {"model": "qwen3-rerank", "input": {"query": "q", "documents": ["a"]}, "parameters": {"top_n": "2"}},
        "parameters.top_n",
    ),
    (
        "parameters-list",
        {"model": "qwen3-rerank", "input": {"query": "q", "documents": ["a"]}, "parameters": [1]},
        "parameters",
    ),
    # A falsy value of the wrong type is no more an object than [1] is: not read as "no options".
    *(
        (
            f"parameters-{name}",
            {"model": "qwen3-rerank", "input": {"query": "q", "documents": ["a"]}, "parameters": value},
            "parameters: must be a JSON object",
        )
        for name, value in (("empty-list", []), ("false", False), ("zero", 0), ("empty-string", ""))
    ),
    ("query-empty", {"model": "qwen3-rerank", "input": {"query": "", "documents": ["a"]}}, "query"),
]


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [pytest.param(route, body, field, id=f"{route}-{case}") for route in ROUTES if route != "native"
     for case, body, field in FLAT_BAD_BODIES]
    + [pytest.param("native", body, field, id=f"native-{case}") for case, body, field in NATIVE_BAD_BODIES],
)  # fmt: skip
def test_a_field_of_the_wrong_type_or_value_is_400_naming_the_field(
    http_server: ServerThread, upstream: FakeUpstream, route: str, body: Any, field: str
) -> None:
    response = post(http_url(http_server), route, body)

    error = assert_error_body(route, response, 400)
    assert field in error["message"]
    assert upstream.requests == []


@pytest.mark.parametrize("parameters", ["absent", None], ids=["absent", "null"])
def test_native_parameters_absent_or_null_are_no_options(
    http_server: ServerThread, upstream: FakeUpstream, parameters: Any
) -> None:
    body: Json = {"model": "qwen3-rerank", "input": {"query": QUERY, "documents": DOCUMENTS}}
    if parameters != "absent":
        body["parameters"] = parameters
    response = post(http_url(http_server), "native", body)

    assert response.status_code == 200, response.text
    assert len(response.json()["output"]["results"]) == len(DOCUMENTS)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "qwen3-rerank", "query": ',
        b"not json at all",
        b"",
        b'{"model": "qwen3-rerank", "query": "caf\xe9 \xff\xfe", "documents": ["a"]}',
        b'{"model": "qwen3-rerank", "query": "\\ud800", "documents": ["a"]}',
    ],
    ids=["truncated", "not-json", "empty", "invalid-utf8", "lone-surrogate"],
)
def test_a_body_that_is_not_json_is_400(http_server: ServerThread, route: str, content: bytes) -> None:
    response = post(http_url(http_server), route, content=content)

    error = assert_error_body(route, response, 400)
    assert "JSON" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_length_size_and_media_type_are_411_413_415(serve: ServerFactory, route: str) -> None:
    with serve(http_port=0, max_message_bytes=64 * 1024) as server:
        url = http_url(server) + ROUTES[route]
        raw = json.dumps(body_for(route)).encode()
        # A generator body goes chunked: no Content-Length.
        chunked = httpx.post(url, content=iter([raw]), headers=JSON_TYPE, timeout=10)
        large = json.dumps(body_for(route, documents=["apple " * 1000] * 20)).encode()
        too_large = httpx.post(url, content=large, headers=JSON_TYPE, timeout=10)
        text = httpx.post(url, content=raw, headers={"Content-Type": "text/plain"}, timeout=10)
        form = httpx.post(url, data={"query": "q"}, timeout=10)
        after = httpx.post(url, content=raw, headers=JSON_TYPE, timeout=10)
        charset = httpx.post(url, content=raw, headers={"Content-Type": "application/json; charset=utf-8"})

    assert len(large) > 64 * 1024
    for response, status in [(chunked, 411), (too_large, 413), (text, 415), (form, 415)]:
        assert_error_body(route, response, status)
    assert "Content-Length" in chunked.json()["message"]
    assert "text/plain" in text.json()["message"]
    assert after.status_code == 200, after.text
    assert charset.status_code == 200, charset.text


@pytest.mark.parametrize("route", ROUTES)
def test_a_full_server_is_429_with_retry_after(
    serve: ServerFactory, upstream: FakeUpstream, route: str
) -> None:
    upstream.always(Fault(delay=2.5))  # holds the one slot while the refusals below run, slow machine too
    with serve(http_port=0, max_concurrent_requests=1) as server, ThreadPoolExecutor(1) as pool:
        url = http_url(server)
        slow = pool.submit(post, url, route, body_for(route))
        assert upstream.wait_for(lambda fake: fake.in_flight == 1)
        refused = post(url, route, body_for(route))
        refused_grpc = expect_error(lambda: server.stub.Rerank(request(), timeout=5))
        health = httpx.get(url + "/healthz", timeout=5)
        first = slow.result(timeout=10)

    body = assert_error_body(route, refused, 429)
    assert "overloaded" in body["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert code_of(refused_grpc) == grpc.StatusCode.RESOURCE_EXHAUSTED  # one admission for both
    assert health.status_code == 200
    assert first.status_code == 200, first.text


@pytest.mark.parametrize("route", ROUTES)
def test_an_upstream_that_is_down_is_503(serve: ServerFactory, upstream: FakeUpstream, route: str) -> None:
    with serve(http_port=0, upstream_retry_backoff=0.01, upstream_breaker_cooldown=0.3) as server:
        upstream.go_down()
        try:
            refused = post(http_url(server), route, body_for(route))
            refused_grpc = expect_error(lambda: server.stub.Rerank(request(), timeout=5))
        finally:
            upstream.come_back()

    assert_error_body(route, refused, 503)
    assert code_of(refused_grpc) == grpc.StatusCode.UNAVAILABLE
    assert refused.headers.get("x-deployment")


@pytest.mark.parametrize("route", ROUTES)
def test_an_upstream_slower_than_the_timeout_is_504(
    serve: ServerFactory, upstream: FakeUpstream, route: str
) -> None:
    upstream.always(Fault(delay=10.0))
    with serve(http_port=0, upstream_timeout=0.2, upstream_max_attempts=1) as server:
        started = time.monotonic()
        late = post(http_url(server), route, body_for(route), timeout=25)
        took = time.monotonic() - started

    assert_error_body(route, late, 504)
    assert took < 5  # the upstream's 10 s were not waited for (a bound, not a timing)


@pytest.mark.parametrize("route", ["native", "cohere-v1"])
def test_an_http_call_has_a_deadline_that_bounds_its_upstream_attempts_and_retries(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture, route: str
) -> None:
    # Each attempt within its own timeout, but the retries together past the call's deadline.
    upstream.always(Fault(delay=10.0))
    settings = {"upstream_timeout": 8.0, "upstream_max_attempts": 5, "http_call_timeout": 0.5}
    with serve(http_port=0, **settings) as server:
        started = time.monotonic()
        late = post(http_url(server), route, body_for(route), timeout=25)
        took = time.monotonic() - started
        [line] = logs.wait_for_calls(1)

    assert_error_body(route, late, 504)
    assert line["code"] == "DEADLINE_EXCEEDED"
    assert took < 5  # the 8 s attempt was cut to the call's deadline (a bound, not a timing)


# --- headers and the access log -------------------------------------------------------------------


def test_request_id_and_deployment_headers_and_the_access_log_line(
    http_server: ServerThread, logs: LogCapture
) -> None:
    url = http_url(http_server)
    deployment = http_server.stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=5).models[0]
    logs.clear()
    answered = post(url, "cohere-v1", body_for("cohere-v1"))
    refused = post(url, "cohere-v1", body_for("cohere-v1", query=""))
    calls = logs.wait_for_calls(2)

    assert answered.status_code == 200
    request_id = answered.headers["x-request-id"]
    assert request_id == answered.json()["id"]
    assert answered.headers["x-deployment"] == deployment.deployments[0].name
    assert answered.headers["x-usage-source"] == "upstream"
    assert answered.headers["Server"] == "rerank-service"
    assert len(calls) == 2
    ok, bad = calls
    assert ok["method"] == bad["method"] == "HTTP POST /v1/rerank"
    assert ok["code"] == "OK"
    assert ok["documents"] == len(DOCUMENTS)
    assert ok["model"] == "qwen3-rerank"
    assert ok["total_tokens"] == answered.json()["usage"]["total_tokens"]
    # The id the caller sees (the upstream's, when one upstream call answered) is on the line.
    assert ok["upstream_request_ids"] == [request_id]
    assert answered.headers["x-upstream-request-ids"] == request_id
    assert bad["code"] == "INVALID_ARGUMENT"
    assert bad["request_id"] == refused.headers["x-request-id"] == refused.json()["id"]
    assert "query" in bad["details"]


def test_models_refused_or_answered_writes_an_access_log_line_and_is_counted_as_list_models_is(
    serve: ServerFactory, logs: LogCapture
) -> None:
    """A key guessed against GET /v1/models leaves its trace, as one guessed over gRPC does."""
    with serve(http_port=0, metrics_port=0, api_keys=(Secret(CALLER_KEY),)) as server:
        url = http_url(server)
        refused = httpx.get(url + "/v1/models", headers=bearer("wrong-key"), timeout=5)
        listed = httpx.get(url + "/v1/models", headers=bearer(CALLER_KEY), timeout=5)
        key = (("authorization", f"Bearer {CALLER_KEY}"),)
        server.stub.ListModels(rerank_pb2.ListModelsRequest(), metadata=key, timeout=5)
        wrong, right, grpc_line = logs.wait_for_calls(3)
        assert server.server is not None
        assert server.server.metrics_port is not None
        samples = scrape(server.server.metrics_port)

    assert (refused.status_code, listed.status_code) == (401, 200)
    assert wrong["method"] == right["method"] == "HTTP GET /v1/models"
    assert wrong["code"] == "UNAUTHENTICATED"
    assert "caller" not in wrong  # nobody the key names
    assert wrong["request_id"] == refused.headers["x-request-id"] == refused.json()["request_id"]
    assert right["code"] == "OK"
    assert grpc_line["caller"] is not None
    assert right["caller"] == grpc_line["caller"]  # the caller, named as ListModels names it
    assert right["request_id"] == listed.headers["x-request-id"]
    for code in ("UNAUTHENTICATED", "OK"):
        assert value(samples, "rerank_calls_total", method="HTTP /v1/models", code=code) == 1


def test_readyz_follows_an_upstream_that_goes_down_and_comes_back(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    # The cool-down must outlast the four calls made while down, on a loaded machine too:
    # once it is over the next call is a probe that tries the upstream (no Retry-After).
    with serve(http_port=0, upstream_retry_backoff=0.01, upstream_breaker_cooldown=3.0) as server:
        url = http_url(server)
        before = httpx.get(url + "/readyz", timeout=5)
        upstream.go_down()
        try:
            for _ in range(2):  # 3 attempts each: the fifth refused connection makes it down
                assert post(url, "native", body_for("native")).status_code == 503
            eventually(lambda: httpx.get(url + "/readyz", timeout=5).status_code == 503, timeout=0.4)
            down = httpx.get(url + "/readyz", timeout=5)
            live_while_down = httpx.get(url + "/healthz", timeout=5)
            circuit_open = post(url, "native", body_for("native"))
            circuit_open_grpc = expect_error(lambda: server.stub.Rerank(request(), timeout=5))
        finally:
            upstream.come_back()
        eventually(lambda: httpx.get(url + "/readyz", timeout=5).status_code == 200, timeout=10)
        after = post(url, "native", body_for("native"))

    assert before.status_code == 200
    assert down.json() == {"status": "not ready"}
    assert live_while_down.status_code == 200  # liveness: restarting would not help
    # Refused at once while down, with a hint when to come back, as gRPC's RetryInfo says.
    assert_error_body("native", circuit_open, 503)
    assert retry_delay(circuit_open_grpc) is not None
    assert int(circuit_open.headers["Retry-After"]) >= 1
    assert after.status_code == 200, after.text


# --- curl --------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_curl_gets_json_from_every_route(serve: ServerFactory, tmp_path: Path, route: str) -> None:
    payload = tmp_path / "request.json"
    payload.write_text(json.dumps(body_for(route, top_n=1, return_documents=True)))
    with serve(http_port=0, api_keys=(Secret(CALLER_KEY),)) as server:
        command = [
            "curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json",
            "-H", f"Authorization: Bearer {CALLER_KEY}", "--data", f"@{payload}",
            "--max-time", "10", http_url(server) + ROUTES[route],
        ]  # fmt: skip
        answered = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)

    assert answered.returncode == 0, answered.stderr
    body = json.loads(answered.stdout)
    assert results_of(route, body)[0][0] == 2
    assert results_of(route, body)[0][2] == DOCUMENTS[2]


def test_curl_sends_a_large_body_after_100_continue(serve: ServerFactory, tmp_path: Path) -> None:
    payload = tmp_path / "large.json"
    documents = ["apple pie with red apple " * 40] * 1500  # 1.5 MB: curl asks first
    payload.write_text(json.dumps(body_for("cohere-v2", documents=documents, top_n=3)))
    with serve(http_port=0, api_keys=(Secret(CALLER_KEY),)) as server:
        command = [
            "curl", "-sS", "-v", "-X", "POST", "-H", "Content-Type: application/json",
            "-H", f"Authorization: Bearer {CALLER_KEY}", "-H", "Expect: 100-continue",
            "--data", f"@{payload}", "--max-time", "20", http_url(server) + ROUTES["cohere-v2"],
        ]  # fmt: skip
        answered = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)

    assert answered.returncode == 0, answered.stderr[-2000:]
    assert "< HTTP/1.1 100 Continue" in answered.stderr
    assert [index for index, _, _ in results_of("cohere-v2", json.loads(answered.stdout))] == [0, 1, 2]


# --- a local backend -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "tiny-qwen3": build_tiny_qwen3_reranker(root / "qwen3"),
        "tiny-cross": build_tiny_cross_encoder(root / "cross"),
    }


@pytest.fixture(scope="module")
def local_server(tiny_models: dict[str, Path]) -> Iterator[ServerThread]:
    spec = ",".join(f"{name}={path}" for name, path in tiny_models.items())
    # No score cache: both doors' answers, usage included, come from the model each time.
    chosen = {"backend": "local", "local_models": spec, "device": "cpu", "cache_memory_mb": 0}
    settings = load_settings(chosen, env={})
    with ServerThread(dataclasses.replace(settings, http_port=0)) as server:
        yield server


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("model", ["tiny-qwen3", "tiny-cross"])
def test_every_route_serves_local_models_as_grpc_does(
    local_server: ServerThread, route: str, model: str
) -> None:
    query, documents = "how do i bake bread", ["cats sleep", "bake bread with flour and yeast", "bread"]
    fields = {"model": model, "top_n": 2, "return_documents": True, "instruct": INSTRUCT}
    response = post(http_url(local_server), route, body_for(route, query, documents, **fields), timeout=60)
    over_grpc = local_server.stub.Rerank(request(query=query, documents=documents, **fields), timeout=60)

    assert response.status_code == 200, response.text
    body = response.json()
    assert results_of(route, body) == grpc_results(over_grpc)
    assert body["usage"]["total_tokens"] == over_grpc.usage.total_tokens > 0
    assert response.headers["x-deployment"] == "local"
    assert response.headers["x-request-id"] == answer_id(route, body)


# --- SIGTERM ---------------------------------------------------------------------------------


def test_a_call_in_flight_when_the_drain_begins_is_answered_with_connection_close(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    """The drain closes each connection once its call is answered: the answer says so, and
    the client opens a new connection for its next call instead of sending that POST (which
    clients do not resend) down one about to close."""
    release = threading.Event()

    def held(answer: Json) -> Json:
        assert release.wait(30), "the test never released the upstream"
        return answer

    with serve(http_port=0) as server, httpx.Client(base_url=http_url(server), timeout=30) as client:
        assert server.server is not None
        assert server.server.http is not None
        assert server.server.http.port is not None
        port = server.server.http.port
        before = client.post(NATIVE, json=body_for("native"))
        upstream.inject(Fault(mutate=held))
        with ThreadPoolExecutor(1) as pool:
            # On the connection the first call left open: kept alive, not closed.
            in_flight = pool.submit(client.post, NATIVE, json=body_for("native"))
            wait_until(lambda: upstream.in_flight == 1, what="the call waiting on the upstream")
            stopping = server.begin(server.server.stop())
            wait_until(lambda: refuses_connections(port), what="the HTTP listener closed as the drain starts")
            release.set()
            during = in_flight.result(timeout=30)
        stopping.result(timeout=30)
        server.server.port = None  # stopped: the fixture need not stop it again

    assert before.status_code == 200
    assert before.headers.get("connection") != "close"
    assert during.status_code == 200, during.text
    assert len(results_of("native", during.json())) == len(DOCUMENTS)
    assert during.headers.get("connection") == "close"


def test_sigterm_lets_http_calls_in_flight_finish_refuses_new_ones_and_exits_zero(
    upstream: FakeUpstream,
) -> None:
    upstream.always(Fault(delay=1.5))
    args = ["--backend", "upstream", "--upstream-url", upstream.url, "--http-port", "0"]
    # No score cache: the identical calls must each be in flight upstream, not coalesced.
    args += ["--shutdown-grace", "10", "--cache-memory-mb", "0"]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service:
        serving = next(event for event in service.events() if event["event"] == "serving")
        url = f"http://127.0.0.1:{serving['http_port']}"
        assert service.process is not None
        # An idle keep-alive connection and a silent one must not hold the exit back.
        kept = httpx.Client(base_url=url, timeout=5)
        assert kept.get("/healthz").status_code == 200
        silent = socket.create_connection(("127.0.0.1", int(serving["http_port"])))
        with closing(kept), closing(silent), ThreadPoolExecutor(len(ROUTES)) as pool:
            in_flight: list[Future[httpx.Response]] = [
                pool.submit(post, url, route, body_for(route)) for route in ROUTES
            ]
            assert upstream.wait_for(lambda fake: fake.in_flight == len(ROUTES))
            signalled = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            eventually(lambda: any(e["event"] == "draining" for e in service.events()))
            port = int(serving["http_port"])
            wait_until(lambda: refuses_connections(port), what="the HTTP listener closed as the drain starts")
            late: list[int | str] = []
            for route in ("native", "cohere-v1"):
                try:
                    late.append(post(url, route, body_for(route), timeout=5).status_code)
                except httpx.ConnectError:
                    late.append("refused")
            try:  # on the connection kept alive from before the signal
                late.append(kept.post(ROUTES["compatible"], json=body_for("compatible")).status_code)
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                late.append("refused")
            answers = [future.result(timeout=15) for future in in_flight]
        exit_code = service.process.wait(timeout=15)
        exit_seconds = time.monotonic() - signalled

    assert [a.status_code for a in answers] == [200] * len(ROUTES), [a.text for a in answers]
    assert all(
        len(results_of(route, a.json())) == len(DOCUMENTS) for route, a in zip(ROUTES, answers, strict=True)
    )
    assert all(status in ("refused", 503) for status in late), late
    assert exit_code == 0
    assert exit_seconds < 9.0  # when the calls were done (1.5 s), not at the 10 s grace
    calls = [e for e in service.events() if e["event"] == "call"]
    assert sorted(c["method"] for c in calls if c["code"] == "OK") == sorted(
        f"HTTP POST {path}" for path in ROUTES.values()
    )
