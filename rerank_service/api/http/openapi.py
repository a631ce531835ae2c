"""The OpenAPI 3.1 document of the HTTP front door (`GET /openapi.json`, docs/openapi.json).

Written by hand to say what the routes accept and answer; tests/integration/
test_http_openapi.py checks real requests and answers against it.

    python -m rerank_service.api.http.openapi > docs/openapi.json    # what `make docs` does
"""

from __future__ import annotations

import json
from typing import Any

from rerank_service import __version__
from rerank_service.api.http.formats import NATIVE_OPTIONS
from rerank_service.core.domain import LongDocuments

Json = dict[str, Any]


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


# What Python's str.strip() removes (str.isspace()), written out: ECMA-262's \s, which
# OpenAPI's patterns use, is another set (it has U+FEFF, not U+001C..U+001F).
_STRIPPED = "[\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
# Characters besides a letter's two ASCII cases that str.lower() makes the letter.
_LOWERED_TO = {"k": "\\u212a"}  # KELVIN SIGN


def _any_case(words: list[str]) -> str:
    """A pattern of the strings `value.strip().lower()` makes one of `words` (ASCII letters)."""
    alternatives = (
        "".join(f"[{letter}{letter.upper()}{_LOWERED_TO.get(letter, '')}]" for letter in word)
        for word in words
    )
    return f"^{_STRIPPED}*(?:{'|'.join(alternatives)}){_STRIPPED}*$"


# What the engine refuses as blank: a string with no character but whitespace, as
# str.strip() reads it. So a text has one character _STRIPPED has not; not `\S`, which is
# ECMA-262's other set there (it passed U+001C, refused U+FEFF alone).
_TEXT = {"type": "string", "pattern": "[^" + _STRIPPED.removeprefix("[")}
_DOCUMENTS = {"type": "array", "minItems": 1, "items": _TEXT}
_RESULT: Json = {
    "type": "object",
    "required": ["index", "relevance_score"],
    "properties": {
        "index": {"type": "integer", "minimum": 0, "description": "the document's position in the request"},
        "relevance_score": {"type": "number", "minimum": 0, "maximum": 1},
        "document": {
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string"}},
            "description": "only with return_documents: a document sent as an object (the Cohere routes) "
            "comes back as sent, every field kept",
        },
        "truncated": {
            "type": "boolean",
            "description": "the document was cut to fit the window (long_documents truncate); present, "
            "with chunks, only for a document longer than the window",
        },
        "chunks": {
            "type": "integer",
            "minimum": 1,
            "description": "how many chunks of the document were scored (absent: 1, the document fit)",
        },
        "best_chunk": {
            "type": "object",
            "required": ["index", "start", "end"],
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "start": {"type": "integer", "minimum": 0},
                "end": {"type": "integer", "minimum": 0},
            },
            "description": "long_documents chunk: the chunk whose score is the document's; its text is "
            "the document's characters (code points) [start, end)",
        },
    },
}
_USAGE: Json = {
    "type": "object",
    "required": ["total_tokens"],
    "properties": {
        "total_tokens": {
            "type": "integer",
            "minimum": 0,
            "description": "tokens the backends scored for this call (the score cache's answers excluded)",
        },
        "cached_tokens": {
            "type": "integer",
            "minimum": 0,
            "description": "tokens of the pairs the score cache answered (as counted when they were scored)",
        },
        "prompt_tokens": {
            "type": "integer",
            "minimum": 0,
            "description": "the Cohere routes: total_tokens again, as Infinity answers (its client needs it)",
        },
    },
}
# The options: each may be null, which the server reads as absent (formats._Fields).
_TOP_N = {
    "type": ["integer", "null"],
    "minimum": 1,
    "maximum": 2**31 - 1,
    "description": "how many results to return (all by default)",
}
_INSTRUCT = {"type": ["string", "null"], "description": "the ranking task, for models that take one"}
_RETURN_DOCUMENTS = {
    "type": ["boolean", "null"],
    "default": False,
    "description": "return each document's text",
}
_LONG_DOCUMENTS = {
    "type": ["string", "null"],
    # The server reads it in any case, around spaces (" Chunk " is chunk).
    "pattern": _any_case([mode.value for mode in LongDocuments]),
    "description": "a document longer than the window: cut it (truncate), score every chunk and rank "
    "it by the best (chunk), or refuse the call (reject), in any case; unset: the route's default, "
    "truncate unless configured",
}
_MAX_TOKENS_PER_DOC = {
    "type": ["integer", "null"],
    "minimum": 1,
    "maximum": 2**31 - 1,
    "description": "the window a document is cut or chunked to, in tokens (unset, or more: the deployment's)",
}
_CHUNK_OVERLAP_TOKENS = {
    "type": ["integer", "null"],
    "minimum": 0,
    "maximum": 2**31 - 1,
    "description": "tokens neighbouring chunks share (unset: an eighth of the window; at most half)",
}
_LONG_DOCUMENT_OPTIONS = {
    "long_documents": _LONG_DOCUMENTS,
    "max_tokens_per_doc": _MAX_TOKENS_PER_DOC,
    "chunk_overlap_tokens": _CHUNK_OVERLAP_TOKENS,
}

SCHEMAS: Json = {
    "NativeRequest": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": _TEXT,
            "input": {
                "type": "object",
                "required": ["query", "documents"],
                "properties": {"query": _TEXT, "documents": _DOCUMENTS},
            },
            "parameters": {
                "type": ["object", "null"],
                "properties": {
                    "top_n": _TOP_N,
                    "return_documents": _RETURN_DOCUMENTS,
                    "instruct": _INSTRUCT,
                    **_LONG_DOCUMENT_OPTIONS,
                },
            },
        },
        # An option beside `input` (where the flat formats keep it) is refused: it goes in `parameters`.
        "not": {"anyOf": [{"required": [name]} for name in NATIVE_OPTIONS]},
    },
    "NativeResponse": {
        "type": "object",
        "required": ["output", "usage", "request_id"],
        "properties": {
            "output": {
                "type": "object",
                "required": ["results"],
                "properties": {"results": {"type": "array", "items": _ref("Result")}},
            },
            "usage": _ref("Usage"),
            "request_id": {"type": "string"},
        },
    },
    "CompatibleRequest": {
        "type": "object",
        "required": ["model", "query", "documents"],
        "properties": {
            "model": _TEXT,
            "query": _TEXT,
            "documents": _DOCUMENTS,
            "top_n": _TOP_N,
            "return_documents": _RETURN_DOCUMENTS,
            "instruct": _INSTRUCT,
            **_LONG_DOCUMENT_OPTIONS,
        },
    },
    "CompatibleResponse": {
        "type": "object",
        "required": ["id", "object", "results", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "list"},
            "model": _TEXT,
            "results": {"type": "array", "items": _ref("Result")},
            "usage": _ref("Usage"),
        },
    },
    "CohereRequest": {
        "type": "object",
        "required": ["model", "query", "documents"],
        "properties": {
            "model": _TEXT,
            "query": _TEXT,
            "documents": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "oneOf": [
                        _TEXT,
                        {
                            "type": "object",
                            "required": ["text"],
                            "properties": {"text": _TEXT},
                            "description": "ranked on its text; its other fields are kept, and the "
                            "object comes back as sent with return_documents",
                        },
                    ]
                },
            },
            "rank_fields": {
                "enum": [["text"], None],
                "description": "the fields to rank documents on: only their text (another list is refused)",
            },
            "top_n": _TOP_N,
            "return_documents": _RETURN_DOCUMENTS,
            "instruct": _INSTRUCT,
            **_LONG_DOCUMENT_OPTIONS,
        },
    },
    "CohereResponse": {
        "type": "object",
        "required": ["id", "model", "results", "usage"],
        "properties": {
            "id": {"type": "string"},
            "model": {"type": "string", "description": "the request's model"},
            "results": {"type": "array", "items": _ref("Result")},
            "meta": {"type": "object"},
            "usage": {"allOf": [_ref("Usage"), {"required": ["prompt_tokens"]}]},
        },
    },
    "Result": _RESULT,
    "Usage": _USAGE,
    "DashScopeError": {
        "type": "object",
        "required": ["code", "message", "request_id"],
        "properties": {
            "code": {"type": "string"},
            "message": {"type": "string"},
            "request_id": {"type": "string"},
        },
    },
    "CohereError": {
        "type": "object",
        "required": ["message"],
        "properties": {"id": {"type": "string"}, "message": {"type": "string"}},
    },
    "Models": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "object", "max_documents", "max_query_tokens", "supports_instruct"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "model"},
                        "owned_by": {"type": "string"},
                        "max_documents": {"type": "integer"},
                        "max_query_tokens": {"type": "integer"},
                        "supports_instruct": {"type": "boolean"},
                        "backend": {"type": "string"},
                        "deployments": {"type": "array", "items": {"type": "object"}},
                    },
                },
            },
        },
    },
    "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "Refusal": {
        "type": "object",
        "required": ["message", "request_id"],
        "properties": {"message": {"type": "string"}, "request_id": {"type": "string"}},
    },
}

# What every rerank route may answer besides 200, and when.
_ERRORS = {
    "400": "a field is missing or of the wrong type, the body is not JSON, or a request rule is broken",
    "401": "no accepted `Authorization: Bearer` key",
    "403": "the caller may not call this model, or (pass-through) the upstream refused the caller's token",
    "404": "the model is not served here",
    "408": "the body did not arrive in time",
    "411": "no Content-Length header",
    "413": "the body is larger than the message size limit",
    "415": "the Content-Type is not application/json",
    "429": "overloaded, a caller over its limits, or the upstream's rate limit: see Retry-After (when known)",
    "500": "a bug (the message names the request id to quote), or an upstream failure an operator must fix",
    "503": "no deployment of the model can answer now",
    "504": "the upstream took too long",
}


_REQUEST_ID = {
    "schema": {"type": "string"},
    "description": "the id to quote (the upstream's, when one upstream call answered)",
}
_RETRY_AFTER = {"schema": {"type": "string"}, "description": "seconds to wait before trying again"}


def _rerank_operation(summary: str, request: str, response: str, error: str) -> Json:
    headers = {
        "x-request-id": {**_REQUEST_ID, "required": True},
        "x-deployment": {
            "schema": {"type": "string"},
            "description": "the deployment(s) that answered",
            "required": True,
        },
        "x-usage-source": {
            "required": True,
            "schema": {"enum": ["upstream", "estimate", "model", "cache", "upstream-chunks-estimated"]},
            "description": "where usage.total_tokens came from (upstream-chunks-estimated: the upstream's "
            "count, of documents cut or chunked by the service's estimate of their tokens)",
        },
        "x-upstream-request-ids": {
            "schema": {"type": "string"},
            "description": "every upstream call's id, comma-separated (an upstream answered)",
        },
        "x-cache": {
            "schema": {"enum": ["hit", "partial", "miss"]},
            "description": "what the score cache answered: every pair, some, or none (absent: not used)",
        },
    }
    responses: Json = {
        "200": {
            "description": "the ranking, best first",
            "headers": headers,
            "content": {"application/json": {"schema": _ref(response)}},
        }
    }
    for status, why in _ERRORS.items():
        error_headers: Json = {"x-request-id": _REQUEST_ID}
        if status in ("429", "503"):
            error_headers["Retry-After"] = _RETRY_AFTER
        responses[status] = {
            "description": why,
            "headers": error_headers,
            "content": {"application/json": {"schema": _ref(error)}},
        }
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": responses,
        }
    }


def _status_operation(summary: str) -> Json:
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {"description": "yes", "content": {"application/json": {"schema": _ref("Status")}}},
                "503": {"description": "no", "content": {"application/json": {"schema": _ref("Status")}}},
            },
        }
    }


def document() -> Json:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rerank-service HTTP front door",
            "version": __version__,
            "description": "The rerank APIs of DashScope (native and OpenAI-compatible) and Cohere, "
            "served by rerank-service with the same routes, keys and limits as its gRPC API.",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/api/v1/services/rerank/text-rerank/text-rerank": _rerank_operation(
                "Rerank, DashScope's native format", "NativeRequest", "NativeResponse", "DashScopeError"
            ),
            "/compatible-api/v1/reranks": _rerank_operation(
                "Rerank, DashScope's OpenAI-compatible format",
                "CompatibleRequest",
                "CompatibleResponse",
                "DashScopeError",
            ),
            "/v1/rerank": _rerank_operation(
                "Rerank, Cohere's format (v1)", "CohereRequest", "CohereResponse", "CohereError"
            ),
            "/v2/rerank": _rerank_operation(
                "Rerank, Cohere's format (v2)", "CohereRequest", "CohereResponse", "CohereError"
            ),
            "/v1/models": {
                "get": {
                    "summary": "The served models (routes) and their deployments",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {
                            "description": "the models",
                            "content": {"application/json": {"schema": _ref("Models")}},
                        },
                        "401": {
                            "description": "no accepted key",
                            "content": {"application/json": {"schema": _ref("Refusal")}},
                        },
                    },
                }
            },
            "/healthz": _status_operation("Live: the process is up and not draining"),
            "/readyz": _status_operation(
                "Ready: every model has a deployment that can answer (gRPC health SERVING)"
            ),
            "/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}
            },
        },
    }


if __name__ == "__main__":
    print(json.dumps(document(), indent=2))
