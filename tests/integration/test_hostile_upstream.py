"""An upstream that breaks the contract in hostile ways never reaches the caller with
UNKNOWN, an oversized or invalid metadata entry, or a credential."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.config.secret import Secret
from rerank_service.testing.fake_upstream import Fault
from tests.conftest import UPSTREAM_KEY, ServerFactory
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, error_info, expect_error, request, trailing
from tests.support.server import ServerThread

Code = grpc.StatusCode
SHORT_TOKEN = "pt-7"  # a pass-through token too short for the logs' masking


def with_request_id(request_id: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def mutate(body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "request_id": request_id}

    return mutate


def rerank_with_metadata(server: ServerThread) -> tuple[rerank_pb2.RerankResponse, dict[str, str]]:
    response, call = server.stub.Rerank.with_call(request(), timeout=10)
    metadata = {key: value for key, value in call.trailing_metadata() if isinstance(value, str)}
    return response, metadata


def test_a_token_count_beyond_int32_is_a_malformed_answer_not_unknown(
    server: ServerThread, upstream: Any
) -> None:
    upstream.inject(Fault(mutate=lambda body: {**body, "usage": {"total_tokens": 2**40}}))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.INTERNAL
    info = error_info(error)
    assert info is not None
    assert info.reason == "UPSTREAM_BAD_RESPONSE"
    assert "int32" in (error.details() or "")


@pytest.mark.parametrize(
    "request_id",
    ["x" * 200_000, "req-1\r\nx-injected: yes", "has spaces in it", f"Bearer {UPSTREAM_KEY}", UPSTREAM_KEY],
    ids=["200k characters", "CR/LF", "spaces", "the reflected header", "the reflected key"],
)
def test_a_bad_upstream_request_id_is_replaced_by_the_services_own_and_the_answer_kept(
    server: ServerThread, upstream: Any, logs: LogCapture, request_id: str
) -> None:
    upstream.inject(Fault(mutate=with_request_id(request_id)))

    response, metadata = rerank_with_metadata(server)

    assert len(response.output.results) == len(request().documents)
    assert len(response.request_id) == 32
    assert response.request_id == metadata["x-request-id"]
    assert UPSTREAM_KEY not in str(response) + str(metadata)
    assert "x-upstream-request-ids" not in metadata
    [dropped] = [event for event in logs.events() if event.get("event") == "upstream request id dropped"]
    assert UPSTREAM_KEY not in str(dropped)
    assert "xxxxxxxx" not in str(dropped)


def test_a_malformed_answer_reflecting_the_key_names_it_nowhere(server: ServerThread, upstream: Any) -> None:
    upstream.inject(
        Fault(
            mutate=lambda body: {"request_id": f"Bearer {UPSTREAM_KEY}", "output": f"Bearer {UPSTREAM_KEY}"}
        )
    )

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.INTERNAL
    seen = f"{error.details()} {error_info(error)} {trailing(error)}"
    assert UPSTREAM_KEY not in seen


def test_a_content_type_reflecting_the_key_is_masked_in_the_error(
    server: ServerThread, upstream: Any
) -> None:
    upstream.inject(Fault(body=b"<html>oops</html>", content_type=f"text/html; key=Bearer {UPSTREAM_KEY}"))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.UNAVAILABLE
    assert UPSTREAM_KEY not in (error.details() or "")


def test_a_content_encoding_reflecting_the_key_is_not_repeated(server: ServerThread, upstream: Any) -> None:
    """The error once quoted an unknown Content-Encoding lowercased: the key in it reached
    the caller, and lowercased, escaped the log's (case-sensitive) masking."""
    upstream.inject(Fault(headers={"content-encoding": f"Bearer {UPSTREAM_KEY}"}))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.UNAVAILABLE
    assert "content-encoding" in (error.details() or "")
    assert UPSTREAM_KEY.lower() not in (error.details() or "").lower()


@pytest.mark.parametrize(
    ("token", "reflected"),
    [("pt-Mixed-Case-Token-0123456789", "Bearer {}"), ("pt-short-0123", "{}")],
    ids=["the header", "a short token alone"],
)
def test_a_content_encoding_reflecting_a_pass_through_token_reaches_neither_caller_nor_log(
    serve: ServerFactory, upstream: Any, logs: LogCapture, token: str, reflected: str
) -> None:
    # No configured key: the logs' masking knows nothing of the token.
    upstream.api_key = token
    upstream.inject(Fault(headers={"content-encoding": reflected.format(token)}))
    with serve(upstream_api_key=None) as server:
        error = expect_error(
            lambda: server.stub.Rerank(
                request(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
            )
        )
        [call] = logs.wait_for_calls(1)

    assert code_of(error) == Code.UNAVAILABLE
    assert "content-encoding" in call["details"]
    assert token.lower() not in f"{error.details()} {trailing(error)}".lower()
    assert token.lower() not in logs.text.lower()


def test_a_short_pass_through_token_reflected_as_the_request_id_never_reaches_the_caller(
    serve: ServerFactory, upstream: Any
) -> None:
    upstream.api_key = SHORT_TOKEN
    upstream.inject(Fault(mutate=with_request_id(f"id-{SHORT_TOKEN}")))
    with serve(upstream_api_key=None) as server:  # no keys at all: callers' tokens go upstream
        response, call = server.stub.Rerank.with_call(
            request(), metadata=(("authorization", f"Bearer {SHORT_TOKEN}"),), timeout=10
        )

    assert SHORT_TOKEN not in response.request_id
    assert all(SHORT_TOKEN not in str(value) for _, value in call.trailing_metadata())


def test_a_plain_upstream_request_id_still_names_the_answer(server: ServerThread, upstream: Any) -> None:
    upstream.inject(Fault(mutate=with_request_id("req-0123456789abcdef")))

    response, metadata = rerank_with_metadata(server)

    assert response.request_id == metadata["x-request-id"] == "req-0123456789abcdef"
    assert Secret(UPSTREAM_KEY).reveal() not in response.request_id


DEEPLY_NESTED = b"[" * 5000 + b"]" * 5000  # past any JSON parser's depth


@pytest.mark.parametrize("status", [200, 503])
def test_json_nested_past_the_parsers_depth_is_a_body_that_is_not_json(
    serve: ServerFactory, upstream: Any, status: int
) -> None:
    """UNAVAILABLE, as a body that is not JSON is (and a 5xx retried as any is): not a
    RecursionError's INTERNAL."""
    upstream.always(Fault(status=status, body=DEEPLY_NESTED))
    with serve(upstream_max_attempts=2, upstream_retry_backoff=0.01) as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.UNAVAILABLE
    info = error_info(error)
    assert info is not None
    assert info.reason == ("UPSTREAM_BAD_RESPONSE" if status == 200 else "UPSTREAM_UNAVAILABLE")
    assert len(upstream.requests) == (1 if status == 200 else 2)


@pytest.mark.parametrize(
    ("status", "code"), [(429, Code.RESOURCE_EXHAUSTED), (503, Code.UNAVAILABLE)], ids=["429", "503"]
)
@pytest.mark.parametrize(
    "retry_after",
    ["Mon, 01 Jan 99999999999999999999 00:00:00 GMT", "Mon, 01 Jan 2030 00:00:00 +99999999999999999999"],
    ids=["year", "offset"],
)
def test_a_retry_after_date_past_any_clock_is_ignored_not_a_crash(
    serve: ServerFactory, upstream: Any, status: int, code: grpc.StatusCode, retry_after: str
) -> None:
    upstream.always(Fault(status=status, headers={"Retry-After": retry_after}))
    with serve(upstream_max_attempts=2, upstream_retry_backoff=0.01) as server:
        error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == code
    assert len(upstream.requests) == 2  # retried as the status is


def test_a_lone_surrogate_in_an_upstream_error_reaches_the_caller_as_that_error(
    server: ServerThread, upstream: Any
) -> None:
    """JSON may escape a lone surrogate (\\ud800), which no gRPC status message can carry:
    such a body reads as one that is not JSON, and the status is the upstream's own."""
    body = b'{"code": "InvalidParameter", "message": "bad \\ud800 input", "request_id": "r-1"}'
    upstream.inject(Fault(status=400, body=body))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.INVALID_ARGUMENT
    info = error_info(error)
    assert info is not None
    assert info.reason == "UPSTREAM_REJECTED_REQUEST"


def test_a_malformed_answer_quoting_a_huge_value_is_cut_like_other_upstream_text(
    server: ServerThread, upstream: Any
) -> None:
    huge = int("9" * 4200)

    def mutate(body: dict[str, Any]) -> dict[str, Any]:
        results = body["output"]["results"]
        return {**body, "output": {"results": [{**results[0], "index": huge}, *results[1:]]}}

    upstream.inject(Fault(mutate=mutate))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.INTERNAL
    assert "malformed" in (error.details() or "")
    assert len(error.details() or "") <= 400  # the message's 300 characters and the request id
