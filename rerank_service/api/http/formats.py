"""The rerank HTTP APIs the front door speaks: requests read into the domain, answers written back.

Three wire formats, each as its clients expect it:

- `native`: DashScope's own (`{model, input: {query, documents}, parameters: {top_n,
  return_documents, instruct, long_documents, max_tokens_per_doc, chunk_overlap_tokens}}`
  in; `{output: {results}, usage, request_id}` out; errors `{code, message, request_id}`),
  what the `dashscope` SDK sends;
- `compatible`: DashScope's OpenAI-compatible one (the same fields flat; `{id, object,
  results, usage}` out);
- `cohere`: Cohere's v1/v2 rerank (`{model, query, documents, top_n, return_documents,
  max_tokens_per_doc}` in, documents as strings or `{text, ...}`; `{id, model, results, meta, usage}`
  out, a document object returned as sent; errors `{message}`), also what vLLM, Jina and
  Infinity clients send.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rerank_service.core.domain import FieldViolation, LongDocuments, RerankOutcome, RerankRequest

Json = dict[str, Any]


class BadRequest(ValueError):
    """The body does not fit the format; `violations` name the fields."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


@dataclass(frozen=True)
class WireFormat:
    name: str
    parse: Callable[[Any], RerankRequest]
    # (outcome, request, request id, the body as sent, parsed) -> body
    render: Callable[[RerankOutcome, RerankRequest, str, Any], Json]
    error: Callable[[str, str, str], Json]  # (code, message, request id) -> body


# How deep objects and arrays may nest inside a Cohere document object (the object itself not
# counted). One is returned as sent, and orjson writes at most 254 levels though it reads 1024:
# a deeper one would be scored (and billed) and then its answer could not be written.
MAX_DOCUMENT_DEPTH = 32


def _nests_deeper(value: Json, limit: int) -> bool:
    """Whether objects or arrays nest more than `limit` deep inside `value`: level by level,
    without recursion, one look at each value (a flat object: one pass over its fields)."""
    level: list[Any] = [value]
    for _ in range(limit + 1):
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


class _Fields:
    """Reads typed fields from a JSON object, collecting every violation before raising."""

    def __init__(self, body: Any, prefix: str = "") -> None:
        self.violations: list[FieldViolation] = []
        self._prefix = prefix
        if not isinstance(body, dict):
            self.violations.append(FieldViolation(prefix.rstrip(".") or "body", "must be a JSON object"))
            body = {}
        self.body: Json = body

    def string(self, name: str, required: bool = True) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required:
                self.violations.append(FieldViolation(self._prefix + name, "is required"))
            return None
        if not isinstance(value, str):
            self.violations.append(FieldViolation(self._prefix + name, "must be a string"))
            return None
        return value

    def integer(self, name: str) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            self.violations.append(FieldViolation(self._prefix + name, "must be an integer"))
            return None
        number = int(value)
        if not -(2**31) <= number < 2**31:
            self.violations.append(FieldViolation(self._prefix + name, "is out of range"))
            return None
        return number

    def boolean(self, name: str) -> bool | None:
        value = self.body.get(name)
        if value is None or isinstance(value, bool):
            return value
        self.violations.append(FieldViolation(self._prefix + name, "must be true or false"))
        return None

    def long_documents(self, name: str) -> LongDocuments | None:
        """`truncate`, `chunk` or `reject` (any case)."""
        value = self.string(name, required=False)
        if value is None:
            return None
        try:
            return LongDocuments(value.strip().lower())
        except ValueError:
            self.violations.append(FieldViolation(self._prefix + name, "must be truncate, chunk or reject"))
            return None

    def ranked_on_text(self, name: str) -> None:
        """Cohere's `rank_fields`: the documents' fields to rank on. Only `text` is read of a
        document object, so any other list is refused rather than silently ranked on `text`."""
        value = self.body.get(name)
        if value is not None and value != ["text"]:
            self.violations.append(
                FieldViolation(
                    self._prefix + name,
                    'only ["text"] is supported: join the fields to rank on into each document\'s text',
                )
            )

    def documents(self, name: str, objects: bool) -> list[str]:
        """A list of strings (or, with `objects`, of `{"text": ...}` too)."""
        value = self.body.get(name)
        field = self._prefix + name
        if value is None:
            self.violations.append(FieldViolation(field, "is required"))
            return []
        if not isinstance(value, list):
            self.violations.append(FieldViolation(field, "must be a list of strings"))
            return []
        texts: list[str] = []
        for index, item in enumerate(value):
            text = item.get("text") if objects and isinstance(item, dict) else item
            if not isinstance(text, str):
                expected = "a string or an object with a string 'text'" if objects else "a string"
                self.violations.append(FieldViolation(f"{field}[{index}]", f"must be {expected}"))
                if len(self.violations) > 20:  # enough to say what is wrong
                    break
                continue
            # An object is returned as sent: one nested deeper than can be written is refused
            # before it is scored. A string costs nothing here.
            if isinstance(item, dict) and _nests_deeper(item, MAX_DOCUMENT_DEPTH):
                self.violations.append(
                    FieldViolation(
                        f"{field}[{index}]",
                        f"must not nest objects or arrays more than {MAX_DOCUMENT_DEPTH} deep",
                    )
                )
                if len(self.violations) > 20:  # enough to say what is wrong
                    break
                continue
            texts.append(text)
        return texts


# The options the native format reads from `parameters` (_read_request's; openapi.py's NativeRequest too).
NATIVE_OPTIONS = (
    "top_n", "return_documents", "instruct", "long_documents", "max_tokens_per_doc", "chunk_overlap_tokens",
)  # fmt: skip


def _parse_native(body: Any) -> RerankRequest:
    top = _Fields(body)
    source = _Fields(top.body.get("input"), "input.")
    given = top.body.get("parameters")
    # Absent (or null) is no options; anything else but an object is refused, falsy or not.
    parameters = _Fields({} if given is None else given, "parameters.")
    # An option beside `input` (as the flat formats put it) would be ignored, and the ranking
    # change silently (a top-level instruct): refused, naming where it goes.
    top.violations.extend(
        FieldViolation(name, f"belongs in parameters in this format: parameters.{name}")
        for name in NATIVE_OPTIONS
        if name in top.body
    )
    return _read_request(top, source, parameters, objects=False)


def _parse_flat(body: Any, objects: bool) -> RerankRequest:
    fields = _Fields(body)
    if objects:  # Cohere's: documents may be objects, ranked on the fields it names
        fields.ranked_on_text("rank_fields")
    return _read_request(fields, fields, fields, objects=objects)


def _read_request(top: _Fields, source: _Fields, parameters: _Fields, *, objects: bool) -> RerankRequest:
    """The request, read where a format keeps each part: the model in `top`, query and
    documents in `source`, the options in `parameters` (one object for the flat formats)."""
    model = top.string("model")
    query = source.string("query")
    documents = source.documents("documents", objects=objects)
    top_n = parameters.integer("top_n")
    return_documents = parameters.boolean("return_documents")
    instruct = parameters.string("instruct", required=False)
    long_documents = parameters.long_documents("long_documents")
    max_tokens_per_doc = parameters.integer("max_tokens_per_doc")
    chunk_overlap_tokens = parameters.integer("chunk_overlap_tokens")
    # dict.fromkeys: each object's violations once, in order, however many parts it holds.
    violations = [v for fields in dict.fromkeys((top, source, parameters)) for v in fields.violations]
    if violations:
        raise BadRequest(violations)
    return RerankRequest(
        model or "",
        query or "",
        documents,
        top_n,
        instruct,
        bool(return_documents),
        long_documents=long_documents,
        max_tokens_per_doc=max_tokens_per_doc,
        chunk_overlap_tokens=chunk_overlap_tokens,
    )


def _results(outcome: RerankOutcome, sent: list[Any] | None = None) -> list[Json]:
    """The ranking; `sent`: the documents as sent, where one sent as an object is returned
    as sent (Cohere's: every field besides `text` is kept), not as `{"text"}` alone."""
    results: list[Json] = []
    for ranked in outcome.results:
        result: Json = {"index": ranked.index, "relevance_score": ranked.score}
        if ranked.text is not None:
            document = None if sent is None else sent[ranked.index]
            result["document"] = document if isinstance(document, dict) else {"text": ranked.text}
        if ranked.truncated or ranked.chunks > 1:  # a long document: what was done with it
            result["truncated"] = ranked.truncated
            result["chunks"] = ranked.chunks
            if ranked.best_chunk is not None:
                best = ranked.best_chunk
                result["best_chunk"] = {"index": best.index, "start": best.start, "end": best.end}
        results.append(result)
    return results


def _usage(outcome: RerankOutcome) -> Json:
    if outcome.cached_tokens:
        return {"total_tokens": outcome.total_tokens, "cached_tokens": outcome.cached_tokens}
    return {"total_tokens": outcome.total_tokens}


def _render_native(outcome: RerankOutcome, request: RerankRequest, request_id: str, body: Any) -> Json:
    return {
        "output": {"results": _results(outcome)},
        "usage": _usage(outcome),
        "request_id": request_id,
    }


def _render_compatible(outcome: RerankOutcome, request: RerankRequest, request_id: str, body: Any) -> Json:
    return {
        "id": request_id,
        "object": "list",
        "model": request.model,
        "results": _results(outcome),
        "usage": _usage(outcome),
    }


# Cohere bills a rerank in search units: one per query with up to this many documents.
SEARCH_UNIT_DOCUMENTS = 100


def search_units(outcome: RerankOutcome, request: RerankRequest) -> int:
    """The search units Cohere would bill the call: one per SEARCH_UNIT_DOCUMENTS documents
    or part of them, however the service split it; none when the score cache answered
    every pair and no backend was called."""
    if outcome.backend_calls == 0:
        return 0
    return math.ceil(len(request.documents) / SEARCH_UNIT_DOCUMENTS)


def _render_cohere(outcome: RerankOutcome, request: RerankRequest, request_id: str, body: Any) -> Json:
    # Cohere's SDKs read `meta`; vLLM, Jina and Infinity clients read `usage`. Infinity's
    # client (infinity-client) requires `model` and `usage.prompt_tokens` (its KeyError
    # otherwise): the tokens scored, as Infinity counts them (prompt_tokens = total_tokens).
    billed = {"search_units": search_units(outcome, request)}
    return {
        "id": request_id,
        "model": request.model,
        "results": _results(outcome, body["documents"]),  # a body parse() took: its list
        "meta": {"api_version": {"version": "2"}, "billed_units": billed},
        "usage": {"prompt_tokens": outcome.total_tokens, **_usage(outcome)},
    }


def _dashscope_error(code: str, message: str, request_id: str) -> Json:
    return {"code": code, "message": message, "request_id": request_id}


def _cohere_error(code: str, message: str, request_id: str) -> Json:
    return {"id": request_id, "message": message}


NATIVE = WireFormat("native", _parse_native, _render_native, _dashscope_error)
COMPATIBLE = WireFormat(
    "compatible", lambda body: _parse_flat(body, objects=False), _render_compatible, _dashscope_error
)
COHERE = WireFormat("cohere", lambda body: _parse_flat(body, objects=True), _render_cohere, _cohere_error)
