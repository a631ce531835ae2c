"""The two DashScope wire dialects: request bodies, result parsing and error bodies."""

from __future__ import annotations

from typing import Any

import pytest

from rerank_service.backends.upstream.compatible import DashScopeCompatible
from rerank_service.backends.upstream.dashscope import DashScopeNative
from rerank_service.backends.upstream.dialect import (
    Dialect,
    MalformedResponse,
    UpstreamErrorBody,
    parse_error_body,
)
from rerank_service.core.domain import BackendRequest, BackendResult, ScoredDocument

DOCUMENTS = ["alpha", "beta", "gamma"]


def backend_request(top_n: int | None = None, instruct: str | None = None) -> BackendRequest:
    return BackendRequest(
        model="qwen3-rerank", query="which?", documents=list(DOCUMENTS), instruct=instruct, top_n=top_n
    )


def results_for(*pairs: tuple[Any, Any]) -> list[dict[str, Any]]:
    return [{"index": index, "relevance_score": score} for index, score in pairs]


def native_body(results: Any, usage: Any = None, request_id: Any = "req-native") -> dict[str, Any]:
    body: dict[str, Any] = {"output": {"results": results}, "request_id": request_id}
    body["usage"] = {"total_tokens": 42} if usage is None else usage
    return body


def compatible_body(results: Any, usage: Any = None, response_id: Any = "req-compat") -> dict[str, Any]:
    body: dict[str, Any] = {"id": response_id, "results": results}
    body["usage"] = {"total_tokens": 42} if usage is None else usage
    return body


GOOD_RESULTS = results_for((1, 0.9), (0, 0.5), (2, 0.1))


def with_results(dialect: Dialect, results: Any, usage: Any = None) -> dict[str, Any]:
    if isinstance(dialect, DashScopeNative):
        return native_body(results, usage)
    return compatible_body(results, usage)


DIALECTS: list[Dialect] = [DashScopeNative(), DashScopeCompatible()]
DIALECT_IDS = ["native", "compatible"]


# --- identity -----------------------------------------------------------------------------------


def test_dialect_names_and_paths() -> None:
    assert DashScopeNative.name == "dashscope"
    assert DashScopeNative.path == "/api/v1/services/rerank/text-rerank/text-rerank"
    assert DashScopeCompatible.name == "compatible"
    assert DashScopeCompatible.path == "/compatible-api/v1/reranks"


# --- build_body ---------------------------------------------------------------------------------


def test_native_body_nests_input_and_parameters_without_optional_fields() -> None:
    body = DashScopeNative().build_body(backend_request())
    assert body == {
        "model": "qwen3-rerank",
        "input": {"query": "which?", "documents": DOCUMENTS},
        "parameters": {"return_documents": False},
    }


def test_native_body_puts_top_n_and_instruct_in_parameters_when_set() -> None:
    body = DashScopeNative().build_body(backend_request(top_n=2, instruct="find it"))
    assert body["parameters"] == {"return_documents": False, "top_n": 2, "instruct": "find it"}
    assert set(body) == {"model", "input", "parameters"}


def test_native_body_keeps_an_empty_instruct_that_was_set() -> None:
    body = DashScopeNative().build_body(backend_request(instruct=""))
    assert body["parameters"]["instruct"] == ""


def test_compatible_body_is_flat_without_optional_fields() -> None:
    body = DashScopeCompatible().build_body(backend_request())
    assert body == {
        "model": "qwen3-rerank",
        "query": "which?",
        "documents": DOCUMENTS,
        "return_documents": False,
    }


def test_compatible_body_carries_top_n_and_instruct_when_set() -> None:
    body = DashScopeCompatible().build_body(backend_request(top_n=1, instruct="find it"))
    assert body == {
        "model": "qwen3-rerank",
        "query": "which?",
        "documents": DOCUMENTS,
        "return_documents": False,
        "top_n": 1,
        "instruct": "find it",
    }


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
def test_return_documents_is_always_false(dialect: Dialect) -> None:
    for request in (backend_request(), backend_request(top_n=3, instruct="x")):
        body = dialect.build_body(request)
        flag = body["parameters"]["return_documents"] if "parameters" in body else body["return_documents"]
        assert flag is False


# --- parse_result: valid bodies -----------------------------------------------------------------


def test_native_parse_result_reads_scores_tokens_and_request_id() -> None:
    result = DashScopeNative().parse_result(native_body(GOOD_RESULTS), backend_request())
    assert result == BackendResult(
        scores=[ScoredDocument(1, 0.9), ScoredDocument(0, 0.5), ScoredDocument(2, 0.1)],
        total_tokens=42,
        upstream_request_id="req-native",
    )


def test_compatible_parse_result_reads_scores_tokens_and_id() -> None:
    result = DashScopeCompatible().parse_result(compatible_body(GOOD_RESULTS), backend_request())
    assert result == BackendResult(
        scores=[ScoredDocument(1, 0.9), ScoredDocument(0, 0.5), ScoredDocument(2, 0.1)],
        total_tokens=42,
        upstream_request_id="req-compat",
    )


def test_compatible_parse_result_falls_back_to_request_id() -> None:
    body = compatible_body(GOOD_RESULTS, response_id=None)
    body["request_id"] = "req-fallback"
    assert DashScopeCompatible().parse_result(body, backend_request()).upstream_request_id == "req-fallback"


@pytest.mark.parametrize("missing_id", [None, "", 17])
def test_missing_or_non_string_request_id_gives_none(missing_id: Any) -> None:
    assert (
        DashScopeNative()
        .parse_result(native_body(GOOD_RESULTS, request_id=missing_id), backend_request())
        .upstream_request_id
        is None
    )
    assert (
        DashScopeCompatible()
        .parse_result(compatible_body(GOOD_RESULTS, response_id=missing_id), backend_request())
        .upstream_request_id
        is None
    )


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
def test_integer_scores_at_the_bounds_are_accepted_as_floats(dialect: Dialect) -> None:
    body = with_results(dialect, results_for((0, 1), (1, 0), (2, 0.5)), {"total_tokens": 0})
    result = dialect.parse_result(body, backend_request())
    assert [(s.index, s.score) for s in result.scores] == [(0, 1.0), (1, 0.0), (2, 0.5)]
    assert all(isinstance(s.score, float) for s in result.scores)
    assert result.total_tokens == 0


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
def test_top_n_expects_only_that_many_results(dialect: Dialect) -> None:
    body = with_results(dialect, results_for((2, 0.8), (0, 0.3)))
    result = dialect.parse_result(body, backend_request(top_n=2))
    assert [s.index for s in result.scores] == [2, 0]


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
def test_top_n_above_document_count_expects_every_document(dialect: Dialect) -> None:
    result = dialect.parse_result(with_results(dialect, GOOD_RESULTS), backend_request(top_n=10))
    assert len(result.scores) == 3


# --- parse_result: malformed bodies -------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
@pytest.mark.parametrize("body", [None, [], "text", 3, True])
def test_body_that_is_not_an_object_is_malformed(dialect: Dialect, body: Any) -> None:
    with pytest.raises(MalformedResponse, match="not a JSON object"):
        dialect.parse_result(body, backend_request())


@pytest.mark.parametrize("output", [None, [], "x"])
def test_native_missing_or_non_object_output_is_malformed(output: Any) -> None:
    body: dict[str, Any] = {"usage": {"total_tokens": 1}}
    if output is not None:
        body["output"] = output
    with pytest.raises(MalformedResponse, match="'output'"):
        DashScopeNative().parse_result(body, backend_request())


def test_native_missing_results_is_malformed() -> None:
    with pytest.raises(MalformedResponse, match="'results'"):
        DashScopeNative().parse_result({"output": {}, "usage": {"total_tokens": 1}}, backend_request())


def test_compatible_missing_results_is_malformed() -> None:
    with pytest.raises(MalformedResponse, match="'results'"):
        DashScopeCompatible().parse_result({"usage": {"total_tokens": 1}}, backend_request())


def test_native_results_at_top_level_instead_of_under_output_is_malformed() -> None:
    body = {"results": GOOD_RESULTS, "usage": {"total_tokens": 1}}
    with pytest.raises(MalformedResponse, match="'output'"):
        DashScopeNative().parse_result(body, backend_request())


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
@pytest.mark.parametrize("results", [{"0": 0.5}, "results", 1, {"index": 0, "relevance_score": 0.5}])
def test_results_that_are_not_a_list_are_malformed(dialect: Dialect, results: Any) -> None:
    with pytest.raises(MalformedResponse, match="not a list"):
        dialect.parse_result(with_results(dialect, results), backend_request())


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
@pytest.mark.parametrize(
    ("results", "top_n", "expected"),
    [
        (results_for((0, 0.5), (1, 0.4)), None, 3),
        (results_for((0, 0.5), (1, 0.4), (2, 0.3), (0, 0.2)), None, 3),
        ([], None, 3),
        (results_for((0, 0.5), (1, 0.4), (2, 0.3)), 2, 2),
        (results_for((0, 0.5)), 2, 2),
        (results_for((0, 0.5), (1, 0.4)), 5, 3),
    ],
)
def test_wrong_number_of_results_is_malformed(
    dialect: Dialect, results: list[dict[str, Any]], top_n: int | None, expected: int
) -> None:
    with pytest.raises(MalformedResponse, match=f"expected {expected} results, got {len(results)}"):
        dialect.parse_result(with_results(dialect, results), backend_request(top_n=top_n))


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
def test_result_item_that_is_not_an_object_is_malformed(dialect: Dialect) -> None:
    results: list[Any] = [
        {"index": 0, "relevance_score": 0.1},
        [1, 0.2],
        {"index": 2, "relevance_score": 0.3},
    ]
    with pytest.raises(MalformedResponse, match=r"results\[1\] is not an object"):
        dialect.parse_result(with_results(dialect, results), backend_request())


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
@pytest.mark.parametrize(
    ("bad_index", "message"),
    [
        (3, "out of range"),
        (99, "out of range"),
        (-1, "out of range"),
        (True, "not an integer"),
        (False, "not an integer"),
        (1.0, "not an integer"),
        ("1", "not an integer"),
        (None, "not an integer"),
    ],
)
def test_bad_index_is_malformed(dialect: Dialect, bad_index: Any, message: str) -> None:
    results = results_for((0, 0.5), (bad_index, 0.4), (2, 0.3))
    with pytest.raises(MalformedResponse, match=rf"results\[1\]\.index.*{message}"):
        dialect.parse_result(with_results(dialect, results), backend_request())


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
def test_missing_index_is_malformed(dialect: Dialect) -> None:
    results = [
        {"index": 0, "relevance_score": 0.5},
        {"relevance_score": 0.4},
        {"index": 2, "relevance_score": 0.3},
    ]
    with pytest.raises(MalformedResponse, match=r"results\[1\]\.index is missing"):
        dialect.parse_result(with_results(dialect, results), backend_request())


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
def test_duplicate_index_is_malformed(dialect: Dialect) -> None:
    results = results_for((0, 0.5), (2, 0.4), (0, 0.3))
    with pytest.raises(MalformedResponse, match=r"results\[2\]\.index 0 appears twice"):
        dialect.parse_result(with_results(dialect, results), backend_request())


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
@pytest.mark.parametrize("bad_score", [1.0001, -0.0001, 2, -1, float("inf"), float("-inf"), float("nan")])
def test_score_outside_unit_interval_or_not_finite_is_malformed(dialect: Dialect, bad_score: float) -> None:
    results = results_for((0, 0.5), (1, bad_score), (2, 0.3))
    with pytest.raises(MalformedResponse, match=r"results\[1\]\.relevance_score .* outside \[0, 1\]"):
        dialect.parse_result(with_results(dialect, results), backend_request())


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
@pytest.mark.parametrize("bad_score", ["0.5", None, True, False, [0.5], {"v": 0.5}])
def test_score_that_is_not_a_number_is_malformed(dialect: Dialect, bad_score: Any) -> None:
    results = results_for((0, 0.5), (1, bad_score), (2, 0.3))
    with pytest.raises(MalformedResponse, match=r"results\[1\]\.relevance_score is missing or not a number"):
        dialect.parse_result(with_results(dialect, results), backend_request())


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
def test_missing_score_is_malformed(dialect: Dialect) -> None:
    results = [{"index": 0, "relevance_score": 0.5}, {"index": 1}, {"index": 2, "relevance_score": 0.3}]
    with pytest.raises(MalformedResponse, match="relevance_score is missing"):
        dialect.parse_result(with_results(dialect, results), backend_request())


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
@pytest.mark.parametrize(
    "usage",
    [
        {},
        [],
        "many",
        {"total_tokens": -1},
        {"total_tokens": 1.5},
        {"total_tokens": "10"},
        {"total_tokens": None},
        {"total_tokens": True},
        {"input_tokens": 10},
    ],
)
def test_missing_or_invalid_usage_is_malformed(dialect: Dialect, usage: Any) -> None:
    with pytest.raises(MalformedResponse, match=r"usage\.total_tokens"):
        dialect.parse_result(with_results(dialect, GOOD_RESULTS, usage), backend_request())


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
def test_absent_usage_key_is_malformed(dialect: Dialect) -> None:
    body = with_results(dialect, GOOD_RESULTS)
    del body["usage"]
    with pytest.raises(MalformedResponse, match=r"usage\.total_tokens"):
        dialect.parse_result(body, backend_request())


# --- parse_error_body ---------------------------------------------------------------------------


def test_error_body_in_dashscope_shape() -> None:
    body = {"code": "InvalidParameter", "message": "top_n is wrong", "request_id": "req-1"}
    assert parse_error_body(body) == UpstreamErrorBody(
        code="InvalidParameter", message="top_n is wrong", request_id="req-1"
    )


def test_error_body_in_openai_shape() -> None:
    body = {
        "error": {"code": "invalid_api_key", "message": "Incorrect API key", "type": "auth_error"},
        "request_id": "req-2",
    }
    assert parse_error_body(body) == UpstreamErrorBody(
        code="invalid_api_key", message="Incorrect API key", request_id="req-2"
    )


def test_error_body_in_openai_shape_falls_back_to_type_and_id() -> None:
    body = {"error": {"message": "slow down", "type": "rate_limit_error"}, "id": "resp-3"}
    assert parse_error_body(body) == UpstreamErrorBody(
        code="rate_limit_error", message="slow down", request_id="resp-3"
    )


def test_error_body_numeric_code_becomes_a_string() -> None:
    assert parse_error_body({"code": 429, "message": "busy"}).code == "429"


@pytest.mark.parametrize("body", [None, "Internal Server Error", [{"code": "x"}], 500, b"{}"])
def test_error_body_that_is_not_a_dict_gives_an_empty_error(body: Any) -> None:
    assert parse_error_body(body) == UpstreamErrorBody()


def test_error_body_with_empty_or_wrong_typed_fields_gives_none_for_them() -> None:
    body = {"code": "", "message": 12, "request_id": ""}
    assert parse_error_body(body) == UpstreamErrorBody()


def test_error_body_with_non_dict_error_reads_the_top_level() -> None:
    body = {"error": "boom", "code": "Throttling", "message": "too many"}
    assert parse_error_body(body) == UpstreamErrorBody(code="Throttling", message="too many")


def test_openai_style_error_with_null_code_uses_its_type() -> None:
    body = {"error": {"code": None, "type": "invalid_request_error", "message": "bad"}}

    assert parse_error_body(body).code == "invalid_request_error"
