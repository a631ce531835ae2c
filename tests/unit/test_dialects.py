"""The upstream wire formats: request bodies, answer parsing, error bodies, score transform
and the qwen3 prompt template."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from rerank_service.backends.upstream.cohere import Cohere
from rerank_service.backends.upstream.compatible import DashScopeCompatible
from rerank_service.backends.upstream.dashscope import DashScopeNative
from rerank_service.backends.upstream.dialect import (
    Dialect,
    DialectOptions,
    MalformedResponse,
    UpstreamAnswer,
    UpstreamErrorBody,
    parse_error_body,
    parse_message_error,
)
from rerank_service.backends.upstream.dialects import build_dialect
from rerank_service.backends.upstream.tei import TextEmbeddingsInference
from rerank_service.backends.upstream.voyage import Voyage
from rerank_service.core.domain import DEFAULT_INSTRUCT, BackendRequest, ScoredDocument
from rerank_service.core.qwen3_prompt import PREFIX, SUFFIX, format_pair, upstream_document, upstream_query

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


def cohere_body(results: Any, usage: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": "req-cohere", "results": results}
    body["usage"] = {"total_tokens": 42} if usage is None else usage
    return body


def tei_body(results: Any, usage: Any = None) -> Any:
    """TEI's bare list, its items named `score`."""
    if not isinstance(results, list):
        return results
    return [
        {("score" if key == "relevance_score" else key): value for key, value in item.items()}
        if isinstance(item, dict)
        else item
        for item in results
    ]


def voyage_body(results: Any, usage: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "data": results, "model": "rerank-2"}
    body["usage"] = {"total_tokens": 42} if usage is None else usage
    return body


GOOD_RESULTS = results_for((1, 0.9), (0, 0.5), (2, 0.1))
SIGMOID = DialectOptions(score_transform="sigmoid")
QWEN3 = DialectOptions(prompt_template="qwen3")


@dataclass(frozen=True)
class Format:
    """A dialect, and how its answers are written."""

    dialect: Dialect
    body: Callable[..., Any]  # (results, usage=None) -> a 2xx body
    list_name: str = "results"
    score_name: str = "relevance_score"
    honours_top_n: bool = True


def formats(options: DialectOptions | None = None) -> list[Any]:
    options = options or DialectOptions()
    return [
        pytest.param(Format(DashScopeNative(options), native_body), id="dashscope"),
        pytest.param(Format(DashScopeCompatible(options), compatible_body), id="compatible"),
        pytest.param(Format(Cohere(options), cohere_body), id="cohere"),
        pytest.param(
            Format(TextEmbeddingsInference(options), tei_body, "answer", "score", honours_top_n=False),
            id="tei",
        ),
        pytest.param(Format(Voyage(options), voyage_body, "data"), id="voyage"),
    ]


FORMATS = formats()
DASHSCOPE_FORMATS = FORMATS[:2]


def answer_of(
    fmt: Format, results: Any, request: BackendRequest | None = None, usage: Any = None
) -> UpstreamAnswer:
    return fmt.dialect.parse_answer(fmt.body(results, usage), request or backend_request())


# --- identity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "path", "documents_per_call", "honours_instruct"),
    [
        ("dashscope", DashScopeNative, "/api/v1/services/rerank/text-rerank/text-rerank", 500, True),
        ("compatible", DashScopeCompatible, "/compatible-api/v1/reranks", 500, True),
        ("cohere", Cohere, "/v1/rerank", 1000, False),
        ("tei", TextEmbeddingsInference, "/rerank", 32, False),
        ("voyage", Voyage, "/v1/rerank", 1000, False),
    ],
)
def test_build_dialect_gives_each_format_its_path_limit_and_instruct_support(
    name: str, kind: type, path: str, documents_per_call: int, honours_instruct: bool
) -> None:
    dialect = build_dialect(name, DialectOptions())
    assert isinstance(dialect, kind)
    assert (dialect.name, dialect.path) == (name, path)
    assert dialect.documents_per_call == documents_per_call
    assert dialect.honours_instruct is honours_instruct


@pytest.mark.parametrize(
    ("name", "honours"),
    [("dashscope", True), ("compatible", True), ("cohere", True), ("tei", True), ("voyage", False)],
)
def test_the_qwen3_template_makes_cohere_and_tei_honour_instruct_and_no_other(
    name: str, honours: bool
) -> None:
    assert build_dialect(name, QWEN3).honours_instruct is honours


def test_build_dialect_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown upstream dialect 'bogus'"):
        build_dialect("bogus", DialectOptions())


# --- build_body: DashScope ----------------------------------------------------------------------


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


@pytest.mark.parametrize("name", ["dashscope", "compatible"])
def test_dashscope_formats_take_instruct_natively_whatever_the_template(name: str) -> None:
    plain = build_dialect(name, DialectOptions()).build_body(backend_request(instruct="find it"))
    templated = build_dialect(name, QWEN3).build_body(backend_request(instruct="find it"))
    assert templated == plain


# --- build_body: cohere, tei, voyage ------------------------------------------------------------


def test_cohere_body_without_optional_fields() -> None:
    assert Cohere().build_body(backend_request()) == {
        "model": "qwen3-rerank",
        "query": "which?",
        "documents": DOCUMENTS,
        "return_documents": False,
    }


def test_cohere_body_carries_top_n_and_no_instruct() -> None:
    assert Cohere().build_body(backend_request(top_n=2, instruct="find it")) == {
        "model": "qwen3-rerank",
        "query": "which?",
        "documents": DOCUMENTS,
        "top_n": 2,
        "return_documents": False,
    }


def test_tei_body_has_no_model_and_no_top_n() -> None:
    assert TextEmbeddingsInference().build_body(backend_request(top_n=2, instruct="find it")) == {
        "query": "which?",
        "texts": DOCUMENTS,
        "truncate": True,
        "raw_scores": False,
        "return_text": False,
    }


def test_voyage_body_without_optional_fields() -> None:
    assert Voyage().build_body(backend_request()) == {
        "model": "qwen3-rerank",
        "query": "which?",
        "documents": DOCUMENTS,
        "truncation": True,
        "return_documents": False,
    }


def test_voyage_body_sends_top_n_as_top_k_and_no_instruct() -> None:
    assert Voyage().build_body(backend_request(top_n=2, instruct="find it")) == {
        "model": "qwen3-rerank",
        "query": "which?",
        "documents": DOCUMENTS,
        "top_k": 2,
        "truncation": True,
        "return_documents": False,
    }


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.id != "tei"])
def test_return_documents_is_always_false(fmt: Any) -> None:
    for request in (backend_request(), backend_request(top_n=3, instruct="x")):
        body = fmt.dialect.build_body(request)
        flag = body["parameters"]["return_documents"] if "parameters" in body else body["return_documents"]
        assert flag is False


@pytest.mark.parametrize(("url_path", "path"), [("", "/v2/rerank"), ("/v2", "/rerank"), ("/v2/", "/rerank/")])
def test_cohere_v2_is_sent_no_return_documents(url_path: str, path: str) -> None:
    """Cohere's v2 API has no such field, and refuses any field it does not know (422)."""
    dialect = build_dialect("cohere", DialectOptions(url_path=url_path, path=path))
    assert dialect.build_body(backend_request(top_n=2)) == {
        "model": "qwen3-rerank",
        "query": "which?",
        "documents": DOCUMENTS,
        "top_n": 2,
    }


@pytest.mark.parametrize(
    ("url_path", "path"),
    [("", None), ("", "/v1/rerank"), ("", "/rerank"), ("", "/v3/rerank"), ("/v1", "/rerank")],
)
def test_the_other_cohere_style_servers_are_sent_return_documents_false(
    url_path: str, path: str | None
) -> None:
    """Jina (/v1/rerank) sends each document's text back unless told not to."""
    dialect = build_dialect("cohere", DialectOptions(url_path=url_path, path=path))
    assert dialect.build_body(backend_request())["return_documents"] is False


# --- the qwen3 prompt template ------------------------------------------------------------------

# vLLM's example for Qwen3-Reranker behind its rerank API (examples/offline_inference/qwen3_reranker.py).
VLLM_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
VLLM_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
VLLM_QUERY_TEMPLATE = "{prefix}<Instruct>: {instruction}\n<Query>: {query}\n"
VLLM_DOCUMENT_TEMPLATE = "<Document>: {doc}{suffix}"


def test_the_shared_template_is_vllms_prefix_and_suffix() -> None:
    assert (PREFIX, SUFFIX) == (VLLM_PREFIX, VLLM_SUFFIX)


def test_the_upstream_strings_are_vllms_templates() -> None:
    query = upstream_query("What is the capital of China?", "Find the capital")
    assert query == VLLM_QUERY_TEMPLATE.format(
        prefix=VLLM_PREFIX, instruction="Find the capital", query="What is the capital of China?"
    )
    document = upstream_document("The capital of China is Beijing.")
    assert document == VLLM_DOCUMENT_TEMPLATE.format(
        doc="The capital of China is Beijing.", suffix=VLLM_SUFFIX
    )


def test_the_two_upstream_strings_make_the_local_scorers_prompt() -> None:
    """What the server concatenates is the model card's prompt, as the local scorer writes it."""
    joined = upstream_query("q", "i") + upstream_document("d")
    assert joined == PREFIX + format_pair("i", "q", "d") + SUFFIX


@pytest.mark.parametrize("instruct", [None, ""])
def test_no_instruct_takes_the_default_instruction(instruct: str | None) -> None:
    assert f"<Instruct>: {DEFAULT_INSTRUCT}\n" in upstream_query("q", instruct)


def test_the_default_instruction_is_the_model_cards_to_the_character() -> None:
    """Qwen3-Reranker's card: format_instruction's default, with no full stop (a prompt that
    differs by a token scores differently from the reference)."""
    card = "Given a web search query, retrieve relevant passages that answer the query"
    assert upstream_query("q", None) == f"{VLLM_PREFIX}<Instruct>: {card}\n<Query>: q\n"


def test_cohere_with_the_qwen3_template_writes_it_into_query_and_documents() -> None:
    body = Cohere(QWEN3).build_body(backend_request(top_n=2, instruct="find the letter"))
    assert body == {
        "model": "qwen3-rerank",
        "query": VLLM_QUERY_TEMPLATE.format(
            prefix=VLLM_PREFIX, instruction="find the letter", query="which?"
        ),
        "documents": [VLLM_DOCUMENT_TEMPLATE.format(doc=doc, suffix=VLLM_SUFFIX) for doc in DOCUMENTS],
        "top_n": 2,
        "return_documents": False,
    }


def test_tei_with_the_qwen3_template_writes_it_into_query_and_texts() -> None:
    body = TextEmbeddingsInference(QWEN3).build_body(backend_request())
    expected_query = VLLM_QUERY_TEMPLATE.format(
        prefix=VLLM_PREFIX, instruction=DEFAULT_INSTRUCT, query="which?"
    )
    assert body["query"] == expected_query
    assert body["texts"] == [VLLM_DOCUMENT_TEMPLATE.format(doc=doc, suffix=VLLM_SUFFIX) for doc in DOCUMENTS]


def test_voyage_ignores_the_qwen3_template() -> None:
    assert Voyage(QWEN3).build_body(backend_request(instruct="x")) == Voyage().build_body(backend_request())


# --- parse_answer: valid bodies -----------------------------------------------------------------


def test_native_parse_answer_reads_scores_tokens_and_request_id() -> None:
    answer = DashScopeNative().parse_answer(native_body(GOOD_RESULTS), backend_request())
    assert answer == UpstreamAnswer(
        scores=[ScoredDocument(1, 0.9), ScoredDocument(0, 0.5), ScoredDocument(2, 0.1)],
        total_tokens=42,
        request_id="req-native",
    )


def test_compatible_parse_answer_reads_scores_tokens_and_id() -> None:
    answer = DashScopeCompatible().parse_answer(compatible_body(GOOD_RESULTS), backend_request())
    assert answer == UpstreamAnswer(
        scores=[ScoredDocument(1, 0.9), ScoredDocument(0, 0.5), ScoredDocument(2, 0.1)],
        total_tokens=42,
        request_id="req-compat",
    )


def test_compatible_parse_answer_falls_back_to_request_id() -> None:
    body = compatible_body(GOOD_RESULTS, response_id=None)
    body["request_id"] = "req-fallback"
    assert DashScopeCompatible().parse_answer(body, backend_request()).request_id == "req-fallback"


@pytest.mark.parametrize("missing_id", [None, "", 17])
def test_missing_or_non_string_request_id_gives_none(missing_id: Any) -> None:
    native = native_body(GOOD_RESULTS, request_id=missing_id)
    assert DashScopeNative().parse_answer(native, backend_request()).request_id is None
    compatible = compatible_body(GOOD_RESULTS, response_id=missing_id)
    assert DashScopeCompatible().parse_answer(compatible, backend_request()).request_id is None


def test_cohere_parse_answer_reads_scores_usage_and_id() -> None:
    body = {
        "id": "rerank-7",
        "model": "BAAI/bge-reranker-v2-m3",
        "usage": {"total_tokens": 17},
        "results": [
            {"index": 1, "relevance_score": 0.9, "document": {"text": "beta"}},
            *results_for((0, 0.5), (2, 0.1)),
        ],
    }
    assert Cohere().parse_answer(body, backend_request()) == UpstreamAnswer(
        scores=[ScoredDocument(1, 0.9), ScoredDocument(0, 0.5), ScoredDocument(2, 0.1)],
        total_tokens=17,
        request_id="rerank-7",
    )


def test_cohere_without_usage_takes_billed_input_tokens() -> None:
    body = {"results": GOOD_RESULTS, "meta": {"billed_units": {"search_units": 1, "input_tokens": 12}}}
    assert Cohere().parse_answer(body, backend_request()).total_tokens == 12


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}},
        {"usage": None},
        {"usage": {"prompt_tokens": 4}},
    ],
    ids=["nothing", "search-units-only", "null-usage", "no-total"],
)
def test_cohere_without_a_token_count_reports_no_usage(extra: dict[str, Any]) -> None:
    answer = Cohere().parse_answer({"id": "x", "results": GOOD_RESULTS, **extra}, backend_request())
    assert answer.total_tokens is None
    assert len(answer.scores) == 3


def test_cohere_usage_wins_over_billed_units() -> None:
    body = {
        "results": GOOD_RESULTS,
        "usage": {"total_tokens": 30},
        "meta": {"billed_units": {"input_tokens": 12}},
    }
    assert Cohere().parse_answer(body, backend_request()).total_tokens == 30


def test_cohere_takes_an_integral_float_token_count() -> None:
    body = {"results": GOOD_RESULTS, "meta": {"billed_units": {"input_tokens": 12.0}}}
    assert Cohere().parse_answer(body, backend_request()).total_tokens == 12


def test_tei_parse_answer_reads_a_bare_list_without_usage() -> None:
    body = [{"index": 1, "score": 0.9}, {"index": 0, "score": 0.5}, {"index": 2, "score": 0.1}]
    assert TextEmbeddingsInference().parse_answer(body, backend_request()) == UpstreamAnswer(
        scores=[ScoredDocument(1, 0.9), ScoredDocument(0, 0.5), ScoredDocument(2, 0.1)],
        total_tokens=None,
        request_id=None,
    )


def test_tei_accepts_every_document_back_when_top_n_is_set() -> None:
    """TEI has no top_n: it scores every text, and the service cuts to top_n itself."""
    answer = TextEmbeddingsInference().parse_answer(tei_body(GOOD_RESULTS), backend_request(top_n=1))
    assert [s.index for s in answer.scores] == [1, 0, 2]


def test_tei_still_refuses_fewer_results_than_documents_when_top_n_is_set() -> None:
    with pytest.raises(MalformedResponse, match="expected 3 results, got 1"):
        TextEmbeddingsInference().parse_answer(tei_body(results_for((1, 0.9))), backend_request(top_n=1))


def test_tei_body_that_is_an_object_is_malformed() -> None:
    with pytest.raises(MalformedResponse, match="not a JSON list"):
        TextEmbeddingsInference().parse_answer({"results": GOOD_RESULTS}, backend_request())


def test_voyage_parse_answer_reads_data_and_usage() -> None:
    body = voyage_body(results_for((2, 0.8), (0, 0.3)), {"total_tokens": 9})
    assert Voyage().parse_answer(body, backend_request(top_n=2)) == UpstreamAnswer(
        scores=[ScoredDocument(2, 0.8), ScoredDocument(0, 0.3)], total_tokens=9, request_id=None
    )


def test_voyage_without_usage_reports_none() -> None:
    body = {"object": "list", "data": GOOD_RESULTS, "model": "rerank-2"}
    assert Voyage().parse_answer(body, backend_request()).total_tokens is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_integer_scores_at_the_bounds_are_accepted_as_floats(fmt: Format) -> None:
    answer = answer_of(fmt, results_for((0, 1), (1, 0), (2, 0.5)), usage={"total_tokens": 0})
    assert [(s.index, s.score) for s in answer.scores] == [(0, 1.0), (1, 0.0), (2, 0.5)]
    assert all(isinstance(s.score, float) for s in answer.scores)
    assert answer.total_tokens == (None if fmt.dialect.name == "tei" else 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_top_n_expects_only_that_many_results_where_the_format_honours_it(fmt: Format) -> None:
    results = results_for((2, 0.8), (0, 0.3)) if fmt.honours_top_n else GOOD_RESULTS
    answer = answer_of(fmt, results, backend_request(top_n=2))
    assert [s.index for s in answer.scores] == ([2, 0] if fmt.honours_top_n else [1, 0, 2])


@pytest.mark.parametrize("fmt", FORMATS)
def test_top_n_above_document_count_expects_every_document(fmt: Format) -> None:
    assert len(answer_of(fmt, GOOD_RESULTS, backend_request(top_n=10)).scores) == 3


# --- the sigmoid score transform ----------------------------------------------------------------

LOGITS = [(1, 2.5), (0, 0), (2, -3)]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("fmt", formats(SIGMOID))
def test_sigmoid_maps_logits_into_scores(fmt: Format) -> None:
    answer = answer_of(fmt, results_for(*LOGITS))
    assert [s.index for s in answer.scores] == [i for i, _ in LOGITS]
    assert [s.score for s in answer.scores] == pytest.approx([sigmoid(x) for _, x in LOGITS])
    assert all(type(s.score) is float for s in answer.scores)
    assert answer.scores[1].score == 0.5


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_sigmoid_a_logit_is_malformed(fmt: Format) -> None:
    with pytest.raises(
        MalformedResponse, match=rf"{fmt.list_name}\[0\]\.{fmt.score_name} 2\.5 is outside \[0, 1\]"
    ):
        answer_of(fmt, results_for(*LOGITS))


@pytest.mark.parametrize("logit", [-800.0, -1e300, -800, 800.0, 1e300])
def test_sigmoid_of_extreme_logits_is_zero_or_one_without_overflow(logit: float) -> None:
    answer = Cohere(SIGMOID).parse_answer(
        cohere_body(results_for((0, logit), (1, 0.0), (2, 1.0))), backend_request()
    )
    assert answer.scores[0].score == (0.0 if logit < 0 else 1.0)
    assert answer.scores[1].score == 0.5


@pytest.mark.parametrize("logit", [-30.0, -3.3, -0.7, 0.4, 12.0])
def test_a_logit_gets_the_same_score_to_the_bit_whatever_its_neighbours(logit: float) -> None:
    """An answer with a logit below about -709 is mapped item by item, not column-wise:
    the other logits' scores must be the same bits either way, or equal documents rank
    apart (and a split call ranks unlike the same call unsplit)."""
    alone = Cohere(SIGMOID).parse_answer(
        cohere_body(results_for((0, logit), (1, 1.0), (2, 0.0))), backend_request()
    )
    beside_overflow = Cohere(SIGMOID).parse_answer(
        cohere_body(results_for((0, logit), (1, -800.0), (2, 0.0))), backend_request()
    )
    assert alone.scores[0].score == beside_overflow.scores[0].score == sigmoid(logit)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_sigmoid_of_a_non_finite_logit_is_malformed(bad: float) -> None:
    body = cohere_body(results_for((0, 0.3), (1, bad), (2, 1.0)))
    with pytest.raises(MalformedResponse, match=r"results\[1\]\.relevance_score .* is not a finite logit"):
        Cohere(SIGMOID).parse_answer(body, backend_request())


def test_sigmoid_of_an_integer_beyond_any_float_is_malformed() -> None:
    body = cohere_body(results_for((0, 0.3), (1, 10**400), (2, 1.0)))
    with pytest.raises(MalformedResponse, match="is not a finite logit"):
        Cohere(SIGMOID).parse_answer(body, backend_request())


@pytest.mark.parametrize("bad_score", ["0.5", None, True])
def test_sigmoid_still_refuses_a_score_that_is_not_a_number(bad_score: Any) -> None:
    body = tei_body(results_for((0, 0.3), (1, bad_score), (2, 1.0)))
    with pytest.raises(MalformedResponse, match=r"answer\[1\]\.score is missing or not a number"):
        TextEmbeddingsInference(SIGMOID).parse_answer(body, backend_request())


@pytest.mark.parametrize("bad_index", [3, -1, True])
def test_sigmoid_still_checks_indexes(bad_index: Any) -> None:
    body = voyage_body(results_for((0, 0.3), (bad_index, 2.0), (2, 1.0)))
    with pytest.raises(MalformedResponse, match=r"data\[1\]\.index"):
        Voyage(SIGMOID).parse_answer(body, backend_request())


# --- parse_answer: malformed bodies -------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("body", [None, "text", 3, True])
def test_body_of_the_wrong_json_type_is_malformed(fmt: Format, body: Any) -> None:
    with pytest.raises(MalformedResponse, match=r"not a JSON (object|list)"):
        fmt.dialect.parse_answer(body, backend_request())


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.id != "tei"])
def test_a_list_where_an_object_belongs_is_malformed(fmt: Any) -> None:
    with pytest.raises(MalformedResponse, match="not a JSON object"):
        fmt.dialect.parse_answer([], backend_request())


@pytest.mark.parametrize("output", [None, [], "x"])
def test_native_missing_or_non_object_output_is_malformed(output: Any) -> None:
    body: dict[str, Any] = {"usage": {"total_tokens": 1}}
    if output is not None:
        body["output"] = output
    with pytest.raises(MalformedResponse, match="'output'"):
        DashScopeNative().parse_answer(body, backend_request())


def test_native_missing_results_is_malformed() -> None:
    with pytest.raises(MalformedResponse, match="'results'"):
        DashScopeNative().parse_answer({"output": {}, "usage": {"total_tokens": 1}}, backend_request())


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.id not in ("dashscope", "tei")])
def test_missing_results_array_is_malformed(fmt: Any) -> None:
    body = fmt.body(GOOD_RESULTS)
    del body[fmt.list_name]
    with pytest.raises(MalformedResponse, match=f"'{fmt.list_name}' is missing or not a list"):
        fmt.dialect.parse_answer(body, backend_request())


def test_native_results_at_top_level_instead_of_under_output_is_malformed() -> None:
    body = {"results": GOOD_RESULTS, "usage": {"total_tokens": 1}}
    with pytest.raises(MalformedResponse, match="'output'"):
        DashScopeNative().parse_answer(body, backend_request())


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.id != "tei"])
@pytest.mark.parametrize("results", [{"0": 0.5}, "results", 1, {"index": 0, "relevance_score": 0.5}])
def test_results_that_are_not_a_list_are_malformed(fmt: Any, results: Any) -> None:
    with pytest.raises(MalformedResponse, match="not a list"):
        answer_of(fmt, results)


@pytest.mark.parametrize("fmt", FORMATS)
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
    fmt: Format, results: list[dict[str, Any]], top_n: int | None, expected: int
) -> None:
    if not fmt.honours_top_n:
        expected = 3
        if len(results) == expected:
            return  # every document back: right for a format without top_n
    with pytest.raises(MalformedResponse, match=f"expected {expected} results, got {len(results)}"):
        answer_of(fmt, results, backend_request(top_n=top_n))


@pytest.mark.parametrize("fmt", FORMATS)
def test_result_item_that_is_not_an_object_is_malformed(fmt: Format) -> None:
    results: list[Any] = [
        {"index": 0, "relevance_score": 0.1},
        [1, 0.2],
        {"index": 2, "relevance_score": 0.3},
    ]
    with pytest.raises(MalformedResponse, match=rf"{fmt.list_name}\[1\] is not an object"):
        answer_of(fmt, results)


@pytest.mark.parametrize("fmt", FORMATS)
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
def test_bad_index_is_malformed(fmt: Format, bad_index: Any, message: str) -> None:
    results = results_for((0, 0.5), (bad_index, 0.4), (2, 0.3))
    with pytest.raises(MalformedResponse, match=rf"{fmt.list_name}\[1\]\.index.*{message}"):
        answer_of(fmt, results)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_index_is_malformed(fmt: Format) -> None:
    results = [
        {"index": 0, "relevance_score": 0.5},
        {"relevance_score": 0.4},
        {"index": 2, "relevance_score": 0.3},
    ]
    with pytest.raises(MalformedResponse, match=rf"{fmt.list_name}\[1\]\.index is missing"):
        answer_of(fmt, results)


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_index_is_malformed(fmt: Format) -> None:
    results = results_for((0, 0.5), (2, 0.4), (0, 0.3))
    with pytest.raises(MalformedResponse, match=rf"{fmt.list_name}\[2\]\.index 0 appears twice"):
        answer_of(fmt, results)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "bad_score", [1.0001, -0.0001, 2, -1, float("inf"), float("-inf"), float("nan"), 10**400]
)
def test_score_outside_unit_interval_or_not_finite_is_malformed(fmt: Format, bad_score: float) -> None:
    results = results_for((0, 0.5), (1, bad_score), (2, 0.3))
    pattern = rf"{fmt.list_name}\[1\]\.{fmt.score_name} .* outside \[0, 1\]"
    with pytest.raises(MalformedResponse, match=pattern):
        answer_of(fmt, results)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad_score", ["0.5", None, True, False, [0.5], {"v": 0.5}])
def test_score_that_is_not_a_number_is_malformed(fmt: Format, bad_score: Any) -> None:
    results = results_for((0, 0.5), (1, bad_score), (2, 0.3))
    pattern = rf"{fmt.list_name}\[1\]\.{fmt.score_name} is missing or not a number"
    with pytest.raises(MalformedResponse, match=pattern):
        answer_of(fmt, results)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_score_is_malformed(fmt: Format) -> None:
    results = [{"index": 0, "relevance_score": 0.5}, {"index": 1}, {"index": 2, "relevance_score": 0.3}]
    with pytest.raises(MalformedResponse, match=f"{fmt.score_name} is missing"):
        answer_of(fmt, results)


BAD_USAGE = [
    [],
    "many",
    {"total_tokens": -1},
    {"total_tokens": 1.5},
    {"total_tokens": "10"},
    {"total_tokens": True},
]


@pytest.mark.parametrize("fmt", DASHSCOPE_FORMATS)
@pytest.mark.parametrize("usage", [*BAD_USAGE, {}, {"total_tokens": None}, {"input_tokens": 10}])
def test_dashscope_missing_or_invalid_usage_is_malformed(fmt: Format, usage: Any) -> None:
    with pytest.raises(MalformedResponse, match=r"usage\.total_tokens"):
        answer_of(fmt, GOOD_RESULTS, usage=usage)


@pytest.mark.parametrize("fmt", DASHSCOPE_FORMATS)
def test_dashscope_absent_usage_key_is_malformed(fmt: Format) -> None:
    body = fmt.body(GOOD_RESULTS)
    del body["usage"]
    with pytest.raises(MalformedResponse, match=r"usage\.total_tokens"):
        fmt.dialect.parse_answer(body, backend_request())


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.id in ("cohere", "voyage")])
@pytest.mark.parametrize("usage", BAD_USAGE)
def test_optional_usage_that_is_there_but_invalid_is_malformed(fmt: Any, usage: Any) -> None:
    with pytest.raises(MalformedResponse, match="usage"):
        answer_of(fmt, GOOD_RESULTS, usage=usage)


@pytest.mark.parametrize("input_tokens", [-1, 1.5, "12", True])
def test_cohere_invalid_billed_input_tokens_is_malformed(input_tokens: Any) -> None:
    body = {"results": GOOD_RESULTS, "meta": {"billed_units": {"input_tokens": input_tokens}}}
    with pytest.raises(MalformedResponse, match=r"meta\.billed_units\.input_tokens"):
        Cohere().parse_answer(body, backend_request())


# --- error bodies: DashScope --------------------------------------------------------------------


def test_error_body_in_dashscope_shape() -> None:
    body = {"code": "InvalidParameter", "message": "top_n is wrong", "request_id": "req-1"}
    assert parse_error_body(body) == UpstreamErrorBody(
        code="InvalidParameter", message="top_n is wrong", request_id="req-1"
    )


@pytest.mark.parametrize("name", ["dashscope", "compatible"])
def test_dashscope_formats_read_their_error_bodies(name: str) -> None:
    body = {"code": "InvalidParameter", "message": "top_n is wrong", "request_id": "req-1"}
    assert build_dialect(name, DialectOptions()).parse_error(body) == parse_error_body(body)


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
    assert parse_message_error(body) == UpstreamErrorBody()


def test_error_body_with_empty_or_wrong_typed_fields_gives_none_for_them() -> None:
    body = {"code": "", "message": 12, "request_id": ""}
    assert parse_error_body(body) == UpstreamErrorBody()


def test_error_body_with_non_dict_error_reads_the_top_level() -> None:
    body = {"error": "boom", "code": "Throttling", "message": "too many"}
    assert parse_error_body(body) == UpstreamErrorBody(code="Throttling", message="too many")


def test_openai_style_error_with_null_code_uses_its_type() -> None:
    body = {"error": {"code": None, "type": "invalid_request_error", "message": "bad"}}

    assert parse_error_body(body).code == "invalid_request_error"


# --- error bodies: cohere, tei, voyage ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"id": "c-1", "message": "invalid request: query must not be empty"},
            UpstreamErrorBody(message="invalid request: query must not be empty", request_id="c-1"),
        ),
        ({"message": "too many tokens"}, UpstreamErrorBody(message="too many tokens")),
        (
            {
                "error": {
                    "message": "The model `x` does not exist.",
                    "type": "NotFoundError",
                    "param": None,
                    "code": 404,
                }
            },
            UpstreamErrorBody(code="NotFoundError", message="The model `x` does not exist."),
        ),
        (
            {
                "object": "error",
                "message": "top_n must be positive",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            UpstreamErrorBody(code="BadRequestError", message="top_n must be positive"),
        ),
        ({"detail": "Not authenticated"}, UpstreamErrorBody(message="Not authenticated")),
        (
            {"detail": [{"loc": ["body", "query"], "msg": "field required", "type": "value_error.missing"}]},
            UpstreamErrorBody(message="body.query: field required"),
        ),
        ({"error": "Mediapipe graph not found"}, UpstreamErrorBody(message="Mediapipe graph not found")),
    ],
    ids=["cohere", "cohere-no-id", "vllm-nested", "vllm-flat", "fastapi", "fastapi-validation", "ovms"],
)
def test_cohere_reads_the_error_body_of_each_server_of_its_family(
    body: Any, expected: UpstreamErrorBody
) -> None:
    assert Cohere().parse_error(body) == expected


def test_tei_reads_its_error_body() -> None:
    body = {"error": "batch size 33 > maximum allowed batch size 32", "error_type": "Validation"}
    assert TextEmbeddingsInference().parse_error(body) == UpstreamErrorBody(
        code="Validation", message="batch size 33 > maximum allowed batch size 32"
    )


def test_voyage_reads_its_error_body() -> None:
    body = {"detail": "The number of documents exceeds the limit of 1000."}
    assert Voyage().parse_error(body) == UpstreamErrorBody(
        message="The number of documents exceeds the limit of 1000."
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("body", [None, [], "oops", 3])
def test_every_format_reads_a_non_object_error_body_as_nothing(fmt: Format, body: Any) -> None:
    assert fmt.dialect.parse_error(body) == UpstreamErrorBody()


def test_fastapi_detail_without_messages_gives_none() -> None:
    assert parse_message_error({"detail": [{"loc": ["body"]}, "x"]}) == UpstreamErrorBody()
    assert parse_message_error({"detail": ""}) == UpstreamErrorBody()
