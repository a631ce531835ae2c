"""What a wire dialect of a rerank HTTP API must provide, and the parsing they share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import repeat
from operator import add, itemgetter, neg, truediv
from typing import Any, ClassVar, Literal, Protocol

from rerank_service.core.domain import MAX_TOKENS, BackendRequest, ScoredDocument
from rerank_service.core.qwen3_prompt import upstream_strings


class MalformedResponse(Exception):
    """The upstream answered 2xx with a body that breaks its own contract."""


@dataclass(frozen=True, slots=True)
class UpstreamErrorBody:
    """The interesting parts of an upstream error body, whatever its dialect."""

    code: str | None = None
    message: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class DialectOptions:
    """How the configured upstream wants its strings written and its scores read."""

    # sigmoid: the upstream answers raw logits; scores are 1/(1+exp(-x)) (--upstream-score-transform).
    score_transform: Literal["none", "sigmoid"] = "none"
    # qwen3: write Qwen3-Reranker's chat template into query and documents (--upstream-prompt-template).
    prompt_template: Literal["none", "qwen3"] = "none"
    # Where the calls go: the path of --upstream-url, and --upstream-path (None: the format's
    # own), for a format whose servers want different bodies at different paths (cohere).
    url_path: str = ""
    path: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """A 2xx answer, read: what the backend turns into its result."""

    scores: list[ScoredDocument]
    total_tokens: int | None  # None: this upstream reported no usage (the backend estimates it)
    request_id: str | None


class Dialect(Protocol):
    """One wire format of a rerank HTTP API."""

    name: str
    # Path of the rerank endpoint, appended to the configured base URL (--upstream-path overrides it).
    path: str
    # Most documents one call takes, unless --upstream-documents-per-call says otherwise.
    documents_per_call: int
    # Whether a request's instruct reaches the model (natively, or written into the prompt).
    honours_instruct: bool

    def build_body(self, request: BackendRequest) -> dict[str, Any]:
        """The JSON request body."""
        ...

    def parse_answer(self, body: Any, request: BackendRequest) -> UpstreamAnswer:
        """Read a 2xx JSON body; raise MalformedResponse if it breaks the format's contract."""
        ...

    def parse_error(self, body: Any) -> UpstreamErrorBody:
        """Read a non-2xx JSON body (anything at all: the parts that are there)."""
        ...


class ResultsShape:
    """Where a format's answer keeps each result's index and score, and how to read them.

    Made once per dialect, so the hot path only looks up attributes.
    """

    __slots__ = ("honours_top_n", "list_name", "score_name", "score_of", "sigmoid")

    def __init__(
        self,
        list_name: str = "results",
        score_name: str = "relevance_score",
        *,
        honours_top_n: bool = True,
        sigmoid: bool = False,
    ) -> None:
        self.list_name = list_name  # what error messages call the array
        self.score_name = score_name
        self.score_of = itemgetter(score_name)
        # False: the upstream scores every document whatever top_n says (the service cuts).
        self.honours_top_n = honours_top_n
        self.sigmoid = sigmoid  # scores are logits: map them through the logistic function


RESULTS = ResultsShape()

_INDEX = itemgetter("index")
_INT: frozenset[type] = frozenset({int})
_FLOAT: frozenset[type] = frozenset({float})
_NUMBER: frozenset[type] = frozenset({int, float})
_ONES = repeat(1.0)  # an endless iterator: zip-like maps stop at the shorter input


def parse_results(items: Any, request: BackendRequest, shape: ResultsShape = RESULTS) -> list[ScoredDocument]:
    """Check and convert a results array: indexes in range and unique, scores in [0, 1]
    (after the logistic function, if the format's scores are logits), one result per
    document (or per top_n when the request asked for fewer and the format honours it).

    The checks run over whole columns in C (types, min and max, a set for duplicates, a
    sum that is NaN if any score is; the logistic function as maps of C functions); only
    an answer that fails one is walked item by item, to say what is wrong with which result.
    """
    document_count = len(request.documents)
    top_n = request.top_n if shape.honours_top_n else None
    expected = document_count if top_n is None else min(top_n, document_count)
    if not isinstance(items, list):
        raise MalformedResponse(f"'{shape.list_name}' is missing or not a list")
    if len(items) != expected:
        raise MalformedResponse(f"expected {expected} results, got {len(items)}")
    if not items:
        return []
    try:
        indexes = list(map(_INDEX, items))
        scores = list(map(shape.score_of, items))
    except (KeyError, TypeError):  # an item that is not an object, or lacks a field
        return _check_each(items, document_count, shape)
    score_types = set(map(type, scores))
    if not (
        set(map(type, indexes)) == _INT  # not bool, not float
        and min(indexes) >= 0
        and max(indexes) < document_count
        and len(set(indexes)) == len(indexes)
        and score_types <= _NUMBER
    ):
        return _check_each(items, document_count, shape)
    if shape.sigmoid:
        return _logistic(items, indexes, scores, document_count, shape)
    if not (
        min(scores) >= 0.0
        and max(scores) <= 1.0
        and not math.isnan(sum(scores))  # min and max can step over a NaN
    ):
        return _check_each(items, document_count, shape)
    if score_types != _FLOAT:
        scores = list(map(float, scores))
    return list(map(ScoredDocument, indexes, scores))


def _logistic(
    items: list[Any], indexes: list[int], logits: list[float], document_count: int, shape: ResultsShape
) -> list[ScoredDocument]:
    """Results whose indexes and number types are checked, their logits mapped to scores
    by 1 / (1 + exp(-x)) column-wise (maps of C functions, no Python call per item)."""
    try:
        if not math.isfinite(sum(logits)):  # an infinite or NaN logit is no logit
            return _check_each(items, document_count, shape)
        scores = list(map(truediv, _ONES, map(add, _ONES, map(math.exp, map(neg, logits)))))
    except OverflowError:
        # exp overflows below about x = -709 (or an integer beyond any float): the
        # item-by-item path takes the numerically stable form, or says what is wrong.
        return _check_each(items, document_count, shape)
    if not (min(scores) >= 0.0 and max(scores) <= 1.0):
        return _check_each(items, document_count, shape)
    return list(map(ScoredDocument, indexes, scores))


def _check_each(items: list[Any], document_count: int, shape: ResultsShape) -> list[ScoredDocument]:
    """The item-by-item check: raises MalformedResponse naming the first wrong result
    (or, for logits that overflow the column-wise logistic function, converts them)."""
    seen: set[int] = set()
    scores: list[ScoredDocument] = []
    name, score_name = shape.list_name, shape.score_name
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise MalformedResponse(f"{name}[{position}] is not an object")
        index, raw = item.get("index"), item.get(score_name)
        if not isinstance(index, int) or isinstance(index, bool):
            raise MalformedResponse(f"{name}[{position}].index is missing or not an integer")
        if not 0 <= index < document_count:
            raise MalformedResponse(
                f"{name}[{position}].index {index} is out of range for {document_count} documents"
            )
        if index in seen:
            raise MalformedResponse(f"{name}[{position}].index {index} appears twice")
        if not isinstance(raw, int | float) or isinstance(raw, bool):
            raise MalformedResponse(f"{name}[{position}].{score_name} is missing or not a number")
        try:
            score = float(raw)
        except OverflowError:  # an integer beyond any float
            score = math.inf if raw > 0 else -math.inf
        if shape.sigmoid:
            if not math.isfinite(score):
                raise MalformedResponse(f"{name}[{position}].{score_name} {raw} is not a finite logit")
            score = _sigmoid(score)
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise MalformedResponse(f"{name}[{position}].{score_name} {raw} is outside [0, 1]")
        seen.add(index)
        scores.append(ScoredDocument(index=index, score=score))
    return scores


def _sigmoid(x: float) -> float:
    """The logistic function, without overflow for any finite x: 1 / (1 + exp(-x)), the
    column-wise path's form, wherever exp(-x) is a float, so that a logit gets the same
    score to the bit whichever path its answer took (an answer with one logit below
    about -709 takes this one: its other logits, and a split call's, must not rank apart)."""
    try:
        return 1.0 / (1.0 + math.exp(-x))
    except OverflowError:  # x below about -709
        e = math.exp(x)
        return e / (1.0 + e)


def parse_total_tokens(usage: Any) -> int:
    """`usage.total_tokens` as a non-negative int32."""
    tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
    if tokens is None:
        raise MalformedResponse("'usage.total_tokens' is missing or not a non-negative integer")
    return non_negative_int(tokens, "usage.total_tokens")


def optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_error_body(body: Any) -> UpstreamErrorBody:
    """Read `{code, message, request_id}` (DashScope) or `{error: {code, message}}` (OpenAI style)."""
    if not isinstance(body, dict):
        return UpstreamErrorBody()
    nested = body.get("error")
    source = nested if isinstance(nested, dict) else body
    code = source.get("code")
    if code in (None, ""):
        code = source.get("type")  # OpenAI-style bodies often send "code": null
    return UpstreamErrorBody(
        code=str(code) if code not in (None, "") else None,
        message=optional_str(source.get("message")),
        request_id=optional_str(body.get("request_id")) or optional_str(body.get("id")),
    )


def non_negative_int(value: Any, where: str) -> int:
    """A token count: a non-negative integer that fits the contract's int32 (a float with an
    integral value, as some servers send counts, is taken as that integer)."""
    if isinstance(value, float) and value.is_integer() and value >= 0:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedResponse(f"'{where}' is not a non-negative integer")
    if value > MAX_TOKENS:
        raise MalformedResponse(f"'{where}' is {value}, more than the contract's int32 holds")
    return value


def detail_text(detail: Any) -> str | None:
    """FastAPI's `detail`: a string, or a list of validation errors `{loc, msg}`."""
    if isinstance(detail, str):
        return detail or None
    if not isinstance(detail, list):
        return None
    parts = []
    for error in detail[:3]:
        if not isinstance(error, dict) or not isinstance(error.get("msg"), str):
            continue
        location = error.get("loc")
        if isinstance(location, list) and location:
            parts.append(f"{'.'.join(map(str, location))}: {error['msg']}")
        else:
            parts.append(error["msg"])
    return "; ".join(parts) or None


def score_shape(
    options: DialectOptions, list_name: str, score_name: str, *, honours_top_n: bool = True
) -> ResultsShape:
    """The results shape of a format, with the configured score transform."""
    return ResultsShape(
        list_name, score_name, honours_top_n=honours_top_n, sigmoid=options.score_transform == "sigmoid"
    )


def optional_total_tokens(usage: Any) -> int | None:
    """`usage.total_tokens` where a format's usage is optional: None when there is none."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise MalformedResponse("'usage' is not an object")
    tokens = usage.get("total_tokens")
    return None if tokens is None else non_negative_int(tokens, "usage.total_tokens")


def parse_message_error(body: Any) -> UpstreamErrorBody:
    """Read the error bodies of the cohere-style servers, TEI and Voyage, whichever it is:

    `{message, id?}` (Cohere), `{error: {message, type, code}}` and `{object: "error",
    message, type, code}` (vLLM, Infinity), `{error: "...", error_type}` (TEI, OpenVINO
    Model Server), `{detail}` (FastAPI servers: Voyage, Jina). The error's name is a
    string `code`, else its `type` (or `error_type`): a numeric `code` repeats the HTTP status.
    """
    if not isinstance(body, dict):
        return UpstreamErrorBody()
    nested = body.get("error")
    source = nested if isinstance(nested, dict) else body
    message = optional_str(source.get("message")) or optional_str(nested) or detail_text(body.get("detail"))
    code = (
        optional_str(source.get("code"))  # a name; vLLM's numeric code is skipped
        or optional_str(source.get("type"))
        or optional_str(body.get("error_type"))
    )
    return UpstreamErrorBody(
        code=code,
        message=message,
        request_id=optional_str(body.get("id")) or optional_str(body.get("request_id")),
    )


class DialectBase:
    """What the formats' classes share: the results shape, made once from the options."""

    # Where a format's answer keeps its results, what it calls each result's score, and
    # whether it scores only top_n documents when asked to.
    list_name: ClassVar[str] = "results"
    score_name: ClassVar[str] = "relevance_score"
    honours_top_n: ClassVar[bool] = True

    def __init__(self, options: DialectOptions | None = None) -> None:
        self.options = options or DialectOptions()
        self._shape = score_shape(
            self.options, self.list_name, self.score_name, honours_top_n=self.honours_top_n
        )

    def scores(self, body: dict[str, Any], request: BackendRequest) -> list[ScoredDocument]:
        """The checked results of a JSON-object answer that keeps them under `list_name`."""
        return parse_results(body.get(self.list_name), request, self._shape)


class TemplatedDialect(DialectBase):
    """A format with no instruction field: with prompt_template "qwen3" (a server running
    Qwen3-Reranker without its template) the instruction is written into the strings."""

    def __init__(self, options: DialectOptions | None = None) -> None:
        super().__init__(options)
        self._template = self.options.prompt_template == "qwen3"
        self.honours_instruct = self._template

    def strings(self, request: BackendRequest) -> tuple[str, list[str]]:
        """The query and documents to send."""
        if self._template:
            return upstream_strings(request.query, request.documents, request.instruct)
        return request.query, request.documents


def json_object(body: Any) -> dict[str, Any]:
    """A 2xx body that must be a JSON object."""
    if not isinstance(body, dict):
        raise MalformedResponse("the body is not a JSON object")
    return body


def flat_body(
    model: str,
    query: str,
    documents: list[str],
    top_n: int | None,
    *,
    top_n_name: str = "top_n",
    return_documents_field: bool = True,
    **fields: Any,
) -> dict[str, Any]:
    """The request body of the flat formats: {model, query, documents, **fields,
    return_documents: false, top_n?}. Documents are never asked back: the engine holds their
    text (`return_documents_field=False`: an API that has no such field, and never sends them)."""
    body: dict[str, Any] = {"model": model, "query": query, "documents": documents, **fields}
    if return_documents_field:
        body["return_documents"] = False
    if top_n is not None:
        body[top_n_name] = top_n
    return body
