"""A large upstream body is decoded off the event loop (calls on other routes do not wait
on it) and read exactly as a small one: the same answer, or the same error."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from rerank_service.backends.upstream import backend
from rerank_service.testing.fake_upstream import Fault
from tests.support.rpc import code_of, error_info, expect_error, request
from tests.support.server import ServerThread

Code = grpc.StatusCode
SMALL = None  # the body as it is: a few hundred bytes
LARGE = 2 * backend.DECODE_IN_LOOP_BYTES
SIZES = pytest.mark.parametrize("pad_to", [SMALL, LARGE], ids=["small", "large"])


@pytest.fixture
def decoded_on(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread of each upstream body's decode, in order."""
    threads: list[int] = []
    decode: Callable[..., Any] = backend._decode_json

    def recording(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return decode(*args)

    monkeypatch.setattr(backend, "_decode_json", recording)
    return threads


async def _current_thread() -> int:
    return threading.get_ident()


def check_decoded_where_expected(server: ServerThread, threads: list[int], pad_to: int | None) -> None:
    loop_thread = server.run(_current_thread())
    assert threads, "no upstream body was decoded"
    if pad_to is SMALL:
        assert set(threads) == {loop_thread}  # the hot path pays no thread hop
    else:
        assert loop_thread not in threads


def nan_score(body: dict[str, Any]) -> dict[str, Any]:
    results = body["output"]["results"]
    return {**body, "output": {"results": [{**results[0], "relevance_score": math.nan}, *results[1:]]}}


@SIZES
def test_an_answer_is_read_the_same_whatever_its_size(
    server: ServerThread, upstream: Any, decoded_on: list[int], pad_to: int | None
) -> None:
    upstream.inject(Fault(pad_to=pad_to))

    response = server.stub.Rerank(request(), timeout=10)

    assert len(response.output.results) == len(request().documents)
    check_decoded_where_expected(server, decoded_on, pad_to)


@SIZES
def test_a_nan_score_is_a_malformed_answer_whatever_the_bodys_size(
    server: ServerThread, upstream: Any, decoded_on: list[int], pad_to: int | None
) -> None:
    """orjson refuses NaN; json's fallback reads it, so the dialect names the broken score."""
    upstream.inject(Fault(mutate=nan_score, pad_to=pad_to))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.INTERNAL
    info = error_info(error)
    assert info is not None
    assert info.reason == "UPSTREAM_BAD_RESPONSE"
    assert "relevance_score nan" in (error.details() or "")
    check_decoded_where_expected(server, decoded_on, pad_to)


@SIZES
def test_a_body_that_is_not_json_is_refused_whatever_its_size(
    server: ServerThread, upstream: Any, decoded_on: list[int], pad_to: int | None
) -> None:
    upstream.inject(Fault(body=b"<html>busy</html>", content_type="text/html", pad_to=pad_to))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.UNAVAILABLE  # a body it cannot use: another deployment may answer
    info = error_info(error)
    assert info is not None
    assert info.reason == "UPSTREAM_BAD_RESPONSE"
    assert "not JSON (content-type text/html)" in (error.details() or "")
    check_decoded_where_expected(server, decoded_on, pad_to)


@SIZES
def test_a_lone_surrogate_in_an_error_body_leaves_the_status_to_decide_whatever_its_size(
    server: ServerThread, upstream: Any, decoded_on: list[int], pad_to: int | None
) -> None:
    body = b'{"code": "InvalidParameter", "message": "bad \\ud800 input", "request_id": "r-1"}'
    upstream.inject(Fault(status=400, body=body, pad_to=pad_to))

    error = expect_error(lambda: server.stub.Rerank(request(), timeout=10))

    assert code_of(error) == Code.INVALID_ARGUMENT
    info = error_info(error)
    assert info is not None
    assert info.reason == "UPSTREAM_REJECTED_REQUEST"
    check_decoded_where_expected(server, decoded_on, pad_to)
