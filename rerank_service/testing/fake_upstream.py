"""A real HTTP server that speaks the hosted rerank API's wire formats, with faults.

Tests, benchmarks and people trying the service without an API key point the
upstream backend at it. It speaks one wire format, chosen when it starts
(`FakeUpstream(format=...)`, `--format`), at that format's paths:

    dashscope (default)  DashScope native (NATIVE_PATH) and OpenAI-compatible (COMPATIBLE_PATH)
    cohere               COHERE_PATHS: Cohere /v1|v2/rerank, vLLM and Jina /v1/rerank,
                         Infinity /rerank, OpenVINO Model Server /v3/rerank (/v2/rerank is
                         Cohere's v2: a field it does not have gets its 422)
    tei                  TEI_PATH: Hugging Face text-embeddings-inference
    voyage               VOYAGE_PATH: Voyage AI

(`aliases=` adds paths, as a gateway in front of the server would.) It checks each
request as strictly as that server (a missing or ill-typed field gets the server's own
4xx and error body; TEI refuses more than `max_batch` texts with its 413), answers with
deterministic lexical-overlap scores (of the texts inside Qwen3-Reranker's prompt
template, when the strings carry it; `logits=True`: as raw logits, `fake_logit`),
reports usage where the format has it (`usage=False`: Cohere's billed search units, no
token count), checks the bearer key if told to, records every request, and injects
faults on demand, in every format: any status and body, delays, malformed or non-JSON
bodies, connection resets (before the answer or mid-body), bodies that trickle, huge
bodies, a flapping upstream (`cycle`), and an upstream that is down altogether
(`go_down`: connections refused). Answers can be gzip-encoded and sent with chunked
transfer encoding, as hosted APIs often send them (`Fault(gzip=True, chunked=True)`),
and it can serve HTTPS (`tls=` an SSL context). It counts the connections it holds
open, so tests can check that none is left behind.

    python -m rerank_service.testing.fake_upstream --port 8080 --latency 0.02
    python -m rerank_service.testing.fake_upstream --format tei --max-batch-size 32 --logits
    python -m rerank_service.testing.fake_upstream --gzip --chunked --tls-cert cert.pem --tls-key key.pem
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import select
import socket
import ssl
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NATIVE_PATH = "/api/v1/services/rerank/text-rerank/text-rerank"
COMPATIBLE_PATH = "/compatible-api/v1/reranks"
COHERE_PATHS = ("/v1/rerank", "/v2/rerank", "/rerank", "/v3/rerank")
COHERE_V2_PATH = "/v2/rerank"
# The fields Cohere's v2 rerank request has (docs.cohere.com/reference/rerank, its SDK's
# v2 client): Cohere refuses any other with 422 "unknown field", `return_documents` too.
COHERE_V2_FIELDS = frozenset(
    {"model", "query", "documents", "top_n", "max_tokens_per_doc", "relevant_spans", "priority"}
)
TEI_PATH = "/rerank"
VOYAGE_PATH = "/v1/rerank"
# The wire formats the fake speaks ("compatible" is the dashscope fake: it serves both paths).
FORMATS = ("dashscope", "compatible", "cohere", "tei", "voyage")
# TEI's default --max-client-batch-size, and Voyage's documents per request.
TEI_MAX_BATCH = 32
VOYAGE_MAX_DOCUMENTS = 1000
# Qwen3-Reranker's template around a pair, as an upstream is sent it (the service's
# core/qwen3_prompt.py; repeated here, as this module imports only the standard library).
_QWEN3_QUERY = re.compile(r"<\|im_start\|>system\n.*?<Instruct>: .*?\n<Query>: (.*)\n", re.DOTALL)
_QWEN3_DOCUMENT_HEAD = "<Document>: "
_QWEN3_DOCUMENT_TAIL = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def count_tokens(text: str) -> int:
    """The fake's token count: one token per word, at least one per text."""
    return max(1, len(words(text)))


def fake_score(query: str, document: str) -> float:
    """Share of the query's distinct words found in the document, in [0, 1]."""
    query_words = set(words(query))
    if not query_words:
        return 0.0
    return round(len(query_words & set(words(document))) / len(query_words), 6)


def fake_logit(query: str, document: str) -> float:
    """The score as a raw logit (what `logits=True` answers): log(p / (1 - p)) of
    `fake_score`, kept within [0.001, 0.999] so it is finite; sigmoid gives the score back
    (but for those bounds), and the order is the same."""
    p = min(max(fake_score(query, document), 0.001), 0.999)
    return math.log(p / (1.0 - p))


def untemplated(query: str, documents: list[str]) -> tuple[str, list[str]]:
    """The texts inside Qwen3-Reranker's prompt template, where the strings carry it
    (as the model reads them): what the fake scores."""
    match = _QWEN3_QUERY.fullmatch(query)
    if match is None:
        return query, documents
    head, tail = len(_QWEN3_DOCUMENT_HEAD), len(_QWEN3_DOCUMENT_TAIL)
    return match.group(1), [
        document[head:-tail]
        if document.startswith(_QWEN3_DOCUMENT_HEAD) and document.endswith(_QWEN3_DOCUMENT_TAIL)
        else document
        for document in documents
    ]


def expected_ranking(query: str, documents: list[str]) -> list[tuple[int, float]]:
    """(index, score) best first, ties in input order: what the service must return."""
    scored = [(index, fake_score(query, document)) for index, document in enumerate(documents)]
    return sorted(scored, key=lambda pair: (-pair[1], pair[0]))


def total_tokens(query: str, documents: list[str]) -> int:
    """The fake's usage: the query counted once per document, plus every document."""
    return sum(count_tokens(query) + count_tokens(document) for document in documents)


@dataclass
class Fault:
    """How to answer one request instead of (or on top of) the normal answer."""

    status: int = 200
    # A dict is sent as JSON, bytes as they are; None sends the normal answer.
    body: dict[str, Any] | bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering
    # Hold the answer until this is set (then `delay`): a test releases the calls it holds
    # once it has seen what it wanted while they were held, with no clock involved.
    until: threading.Event | None = None
    reset: bool = False  # close the connection abruptly instead of answering
    # Edit the normal JSON answer before it is sent (wrong indexes, scores...): a dict,
    # or for TEI a list.
    mutate: Callable[[Any], Any] | None = None
    # (bytes, seconds): send the body this many bytes at a time, pausing between writes.
    trickle: tuple[int, float] | None = None
    # Send the status line, the headers (announcing the full length) and this many
    # bytes of the body, then reset the connection: a reset mid-body.
    reset_after_bytes: int | None = None
    # Pad the body with trailing whitespace (still valid JSON) to this many bytes,
    # streamed in chunks: a huge body without a huge string per request. With `gzip`
    # it is the decoded size: `Fault(gzip=True, pad_to=1 << 30)` is a small gzip bomb.
    pad_to: int | None = None
    # Send the body gzip-encoded (`content-encoding: gzip`), whatever the request accepts.
    gzip: bool = False
    # Send the body with `transfer-encoding: chunked` (one chunk per write) instead of a
    # content-length. With `reset_after_bytes` the reset comes mid-chunk.
    chunked: bool = False


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: Any
    received_at: float
    # Body bytes written so far (gzip-encoded if so sent, chunk framing not counted),
    # and whether the whole answer went out.
    body_bytes_sent: int = 0
    answered: bool = False


# Padding for `Fault.pad_to`, written again and again: one 64 KiB string per process.
_PADDING = b" " * 65536
# A delay of this long stands for "never answers" (the caller gives up first).
NEVER = 3600.0


class FakeUpstream:
    """Run with `with FakeUpstream() as upstream:`; `upstream.url` is its base URL."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        models: tuple[str, ...] = ("qwen3-rerank",),
        latency: float = 0.0,
        record: bool = True,
        tls: ssl.SSLContext | None = None,
        *,
        format: str = "dashscope",
        logits: bool = False,
        usage: bool = True,
        max_batch: int = TEI_MAX_BATCH,
        aliases: dict[str, str] | None = None,
    ) -> None:
        """`tls`: serve HTTPS with this server-side context (its certificate and key).
        `format`: the wire format spoken (FORMATS). `logits`: answer raw logits
        (`fake_logit`) instead of scores in [0, 1], as some servers do. `usage`: False
        answers cohere without a token count (Cohere bills search units) and voyage
        without usage. `max_batch`: TEI's --max-client-batch-size (more texts: 413).
        `aliases`: more paths, each answered as the format's path it names (an upstream
        behind a gateway: `{"/gateway/rerank": TEI_PATH}`); `requests` keep the path called."""
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
        self.format = "dashscope" if format == "compatible" else format
        self.logits = logits
        self.usage = usage
        self.max_batch = max_batch
        self.aliases = dict(aliases or {})
        self.api_key = api_key
        # Tests read `requests`; a long benchmark run must not keep every body.
        self.record = record
        self.models = models
        self.latency = latency
        self.requests: list[RecordedRequest] = []
        # Callers that hung up while the fake was still delaying its answer.
        self.abandoned: list[RecordedRequest] = []
        # Requests being answered right now, and the most there ever were at once.
        self.in_flight = 0
        self.max_in_flight = 0
        # Connections accepted in all, and those still open (accepted minus closed).
        self.connections_accepted = 0
        self.open_connections = 0
        self._sockets: set[socket.socket] = set()
        self._faults: deque[Fault] = deque()
        self._always: Fault | None = None
        self._cycle: tuple[Fault, ...] = ()
        self._poisons: dict[str, Fault] = {}  # query marker -> the fault such a request gets
        self._cycle_position = 0
        self._lock = threading.Lock()
        # Notified whenever a request or a connection starts or ends (see `wait_for`).
        self._changed = threading.Condition(self._lock)
        self._tls = tls
        self._server = _Server((host, port), _handler_for(self), self)
        self._address: tuple[str, int] = (str(self._server.server_address[0]), self._server.server_address[1])
        self._thread = self._serving_thread()
        self._down = False

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) it listens on (the same after `go_down` and `come_back`)."""
        return self._address

    @property
    def url(self) -> str:
        host, port = self._address
        return f"{'https' if self._tls is not None else 'http'}://{host}:{port}"

    def _serving_thread(self) -> threading.Thread:
        return threading.Thread(target=self._server.serve_forever, name="fake-upstream", daemon=True)

    def start(self) -> FakeUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self._down:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
        self._drop_connections()

    def go_down(self) -> None:
        """Act like a crashed upstream: close every connection and stop listening, so
        new connections are refused, until `come_back`."""
        if self._down:
            return
        self._down = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._drop_connections()

    def come_back(self) -> None:
        """Listen again on the same port after `go_down`."""
        if not self._down:
            return
        self._server = _Server(self._address, _handler_for(self), self)
        self._thread = self._serving_thread()
        self._thread.start()
        self._down = False

    def _drop_connections(self) -> None:
        with self._lock:
            live = list(self._sockets)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Answer the next `times` requests with `fault`."""
        with self._lock:
            self._faults.extend([fault] * times)

    def always(self, fault: Fault | None) -> None:
        """Answer every request with `fault` (None: back to normal)."""
        with self._lock:
            self._always = fault

    def cycle(self, faults: Sequence[Fault]) -> None:
        """Answer requests with `faults` in turn, over and over: a flapping upstream.

        `Fault()` in the sequence is a normal answer; an empty sequence ends the cycle.
        Faults queued by `inject` come first; the cycle takes precedence over `always`.
        """
        with self._lock:
            self._cycle = tuple(faults)
            self._cycle_position = 0

    def poison(self, marker: str, fault: Fault | None) -> None:
        """Answer every request whose query contains `marker` with `fault` (None: stop),
        whatever else is going on: a request that makes the upstream fail, as a hostile
        or unlucky caller's does, while other requests are answered as usual."""
        with self._lock:
            if fault is None:
                self._poisons.pop(marker, None)
            else:
                self._poisons[marker] = fault

    def reset(self) -> None:
        """Back to normal answers: clears faults, the cycle and the recordings (not
        the connection counts, which describe connections, not requests)."""
        with self._lock:
            self._faults.clear()
            self._always = None
            self._cycle = ()
            self._cycle_position = 0
            self._poisons.clear()
            self.requests.clear()
            self.abandoned.clear()
            self.in_flight = self.max_in_flight = 0

    def wait_for(self, condition: Callable[[FakeUpstream], bool], timeout: float = 5.0) -> bool:
        """Block until `condition(self)` holds (checked whenever a request or connection
        starts or ends); False if it still does not after `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: condition(self), timeout)

    def _next_fault(self, body: Any) -> Fault | None:
        with self._lock:
            if self._poisons:
                query = _query_of(body)
                for marker, fault in self._poisons.items():
                    if marker in query:
                        return fault
            if self._faults:
                return self._faults.popleft()
            if self._cycle:
                fault = self._cycle[self._cycle_position % len(self._cycle)]
                self._cycle_position += 1
                return fault
            return self._always

    def _record(self, request: RecordedRequest) -> None:
        with self._changed:
            if self.record:
                self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._changed.notify_all()

    def _finished(self) -> None:
        with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    def _abandon(self, request: RecordedRequest) -> None:
        with self._lock:
            self.abandoned.append(request)

    def _connection_opened(self, sock: socket.socket) -> None:
        with self._changed:
            self.connections_accepted += 1
            self.open_connections += 1
            self._sockets.add(sock)
            self._changed.notify_all()

    def _connection_closed(self, sock: socket.socket) -> None:
        with self._changed:
            self.open_connections -= 1
            self._sockets.discard(sock)
            self._changed.notify_all()

    def answer(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        """The normal answer (status, JSON) of the upstream to one request."""
        request_id = str(uuid.uuid4())
        path = self.aliases.get(path, path)
        if self.format == "cohere":
            return self._cohere(path, headers, body, request_id)
        if self.format == "tei":
            return self._tei(path, headers, body)
        if self.format == "voyage":
            return self._voyage(path, headers, body)
        return self._dashscope(path, headers, body, request_id)

    def _authorized(self, headers: dict[str, str]) -> bool:
        return self.api_key is None or headers.get("authorization") == f"Bearer {self.api_key}"

    def _ranking(self, query: str, documents: list[str]) -> list[tuple[int, float]]:
        """(index, score or logit) best first, scored on the texts inside any Qwen3 template."""
        query, documents = untemplated(query, documents)
        ranking = expected_ranking(query, documents)
        if self.logits:
            return [(index, fake_logit(query, documents[index])) for index, _ in ranking]
        return ranking

    def _dashscope(
        self, path: str, headers: dict[str, str], body: Any, request_id: str
    ) -> tuple[int, dict[str, Any]]:
        if path not in (NATIVE_PATH, COMPATIBLE_PATH):
            return 404, _error("NotFound", f"no route {path}", request_id)
        if not self._authorized(headers):
            return 401, _error("InvalidApiKey", "Invalid API-key provided.", request_id)
        if not isinstance(body, dict):
            return 400, _error("InvalidParameter", "body must be a JSON object", request_id)
        native = path == NATIVE_PATH
        source = body.get("input", {}) if native else body
        parameters = body.get("parameters", {}) if native else body
        model, query, documents = body.get("model"), source.get("query"), source.get("documents")
        if not isinstance(query, str) or not isinstance(documents, list) or not documents:
            return 400, _error("InvalidParameter", "query and documents are required", request_id)
        if model not in self.models:
            return 404, _error("ModelNotFound", f"Model not exist: {model}", request_id)
        top_n = parameters.get("top_n")
        ranking = self._ranking(query, documents)
        if isinstance(top_n, int):
            ranking = ranking[:top_n]
        results = [{"index": index, "relevance_score": score} for index, score in ranking]
        usage = {"total_tokens": total_tokens(query, documents)}
        if native:
            return 200, {"output": {"results": results}, "usage": usage, "request_id": request_id}
        return 200, {"id": request_id, "object": "list", "results": results, "usage": usage}

    def _cohere(
        self, path: str, headers: dict[str, str], body: Any, request_id: str
    ) -> tuple[int, dict[str, Any]]:
        """Cohere's checks and answer; with `usage` (the default) the token count of vLLM,
        Jina and Infinity, without it Cohere's own billed search units."""

        def error(status: int, message: str) -> tuple[int, dict[str, Any]]:
            return status, {"id": request_id, "message": message}

        if path not in COHERE_PATHS:
            return error(404, f"no route {path}")
        if not self._authorized(headers):
            return error(401, "invalid api token")
        if not isinstance(body, dict):
            return error(400, "invalid request: the body must be a JSON object")
        if path == COHERE_V2_PATH:
            unknown = next((key for key in body if key not in COHERE_V2_FIELDS), None)
            if unknown is not None:
                return error(
                    422,
                    f"unknown field: parameter '{unknown}' is not a valid field. For proper usage, please "
                    "refer to https://docs.cohere.com/reference/rerank",
                )
        model, query, documents = body.get("model"), body.get("query"), body.get("documents")
        top_n, return_documents = body.get("top_n"), body.get("return_documents")
        if not isinstance(model, str):
            return error(400, "invalid request: model is required and must be a string")
        if not isinstance(query, str):
            return error(400, "invalid request: query is required and must be a string")
        if not isinstance(documents, list):
            return error(400, "invalid request: documents is required and must be a list")
        texts: list[str] = []
        for position, document in enumerate(documents):
            text = document.get("text") if isinstance(document, dict) else document
            if not isinstance(text, str):
                return error(
                    400, f"invalid request: documents[{position}] must be a string or an object with 'text'"
                )
            texts.append(text)
        if top_n is not None and not _is_int(top_n):
            return error(400, "invalid request: top_n must be an integer")
        if return_documents is not None and not isinstance(return_documents, bool):
            return error(400, "invalid request: return_documents must be a boolean")
        if not query.strip():
            return error(422, "invalid request: query must not be empty")
        if not texts:
            return error(422, "invalid request: list of documents must not be empty")
        if top_n is not None and top_n < 1:
            return error(422, f"invalid request: top_n must be at least 1, got {top_n}")
        if model not in self.models:
            return error(
                404,
                f"model '{model}' not found, make sure the correct model ID was used and that you have "
                "access to the model.",
            )
        ranking = self._ranking(query, texts)
        if top_n is not None:
            ranking = ranking[:top_n]
        results: list[dict[str, Any]] = [
            {"index": index, "relevance_score": score} for index, score in ranking
        ]
        if return_documents:
            for result in results:
                result["document"] = {"text": texts[result["index"]]}
        answer: dict[str, Any] = {"id": request_id, "results": results}
        if self.usage:
            answer["model"] = model
            answer["usage"] = {"total_tokens": total_tokens(query, texts)}
        else:
            answer["meta"] = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}
        return 200, answer

    def _tei(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        """TEI's checks and answer: every text, best first, no usage; 413 beyond `max_batch`
        (its router's statuses: Validation 413, Tokenizer 422, Empty 400, Backend 424,
        Overloaded 429, Unhealthy 503)."""

        def error(status: int, message: str, kind: str = "Validation") -> tuple[int, dict[str, Any]]:
            return status, {"error": message, "error_type": kind}

        def undeserializable(why: str) -> tuple[int, str]:
            # Refused before TEI's own code runs, by its web framework (axum): 422, plain text.
            return 422, f"Failed to deserialize the JSON body into the target type: {why}"

        if path != TEI_PATH:
            return error(404, f"no route {path}", "NotFound")
        if not self._authorized(headers):
            return error(401, "Unauthorized", "Unauthorized")
        if not isinstance(body, dict):
            return undeserializable("invalid type: expected struct RerankRequest")
        query, texts = body.get("query"), body.get("texts")
        if query is None or texts is None:
            return undeserializable(f"missing field `{'query' if query is None else 'texts'}`")
        if not isinstance(query, str):
            return undeserializable("query: invalid type: expected a string")
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            return undeserializable("texts: invalid type: expected a sequence of strings")
        for flag in ("raw_scores", "return_text"):
            if flag in body and not isinstance(body[flag], bool):
                return undeserializable(f"{flag}: invalid type: expected a boolean")
        if body.get("truncate") is not None and not isinstance(body["truncate"], bool):
            return undeserializable("truncate: invalid type: expected a boolean")
        if body.get("truncation_direction", "Right") not in ("Left", "Right"):
            return undeserializable("truncation_direction: unknown variant, expected `Left` or `Right`")
        if not texts:
            return error(400, "`texts` cannot be empty", "Empty")
        if len(texts) > self.max_batch:
            return error(413, f"batch size {len(texts)} > maximum allowed batch size {self.max_batch}")
        query_text, documents = untemplated(query, texts)
        ranking = expected_ranking(query_text, documents)
        logits = self.logits or body.get("raw_scores") is True
        answer: list[dict[str, Any]] = [
            {"index": index, "score": fake_logit(query_text, documents[index]) if logits else score}
            for index, score in ranking
        ]
        if body.get("return_text"):
            for item in answer:
                item["text"] = texts[item["index"]]
        return 200, answer

    def _voyage(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, dict[str, Any]]:
        """Voyage's checks and answer; top_k cuts it."""

        def error(status: int, detail: str) -> tuple[int, dict[str, Any]]:
            return status, {"detail": detail}

        if path != VOYAGE_PATH:
            return error(404, "Not Found")
        if not self._authorized(headers):
            return error(401, "Provided API key is invalid.")
        if not isinstance(body, dict):
            return error(400, "Request body must be a JSON object.")
        model, query, documents, top_k = (
            body.get("model"),
            body.get("query"),
            body.get("documents"),
            body.get("top_k"),
        )
        if not isinstance(model, str):
            return error(400, "Field 'model' is required and must be a string.")
        if not isinstance(query, str):
            return error(400, "Field 'query' is required and must be a string.")
        if not isinstance(documents, list) or not all(isinstance(document, str) for document in documents):
            return error(400, "Field 'documents' is required and must be a list of strings.")
        if not documents:
            return error(400, "Field 'documents' must not be empty.")
        if len(documents) > VOYAGE_MAX_DOCUMENTS:
            return error(
                400,
                f"The number of documents ({len(documents)}) exceeds the limit of {VOYAGE_MAX_DOCUMENTS}.",
            )
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            return error(400, "Field 'top_k' must be a positive integer.")
        for flag in ("truncation", "return_documents"):
            if body.get(flag) is not None and not isinstance(body[flag], bool):
                return error(400, f"Field '{flag}' must be a boolean.")
        if model not in self.models:
            return error(400, f"Model {model} is not supported. Supported models are {list(self.models)}.")
        ranking = self._ranking(query, documents)
        if top_k is not None:
            ranking = ranking[:top_k]
        data: list[dict[str, Any]] = [{"index": index, "relevance_score": score} for index, score in ranking]
        if body.get("return_documents"):
            for item in data:
                item["document"] = documents[item["index"]]
        answer: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if self.usage:
            answer["usage"] = {"total_tokens": total_tokens(query, documents)}
        return 200, answer


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# A query holding "[[delay=1.5]]" is answered 1.5 s late: how clients in other languages,
# which cannot reach into this process to inject a fault, test their deadlines.
_DELAY_MARKER = re.compile(r"\[\[delay=([0-9]+(?:\.[0-9]+)?)\]\]")


def _query_of(body: Any) -> str:
    """The query of a request in any format ('' when there is none)."""
    if not isinstance(body, dict):
        return ""
    source = body.get("input", body)
    query = source.get("query") if isinstance(source, dict) else None
    return query if isinstance(query, str) else ""


def _asked_delay(body: Any) -> float:
    match = _DELAY_MARKER.search(_query_of(body))
    return min(float(match.group(1)), 30.0) if match else 0.0


def _error(code: str, message: str, request_id: str) -> dict[str, Any]:
    return {"code": code, "message": message, "request_id": request_id}


class _Server(ThreadingHTTPServer):
    """One thread per connection; tells the fake when connections open and close."""

    daemon_threads = True
    # socketserver's default backlog is 5: a burst of new connections (50 calls at once)
    # would see SYNs dropped and retried a second later, which no real API server does.
    request_queue_size = 1024

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeUpstream
    ) -> None:
        self.fake = fake
        super().__init__(address, handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.fake._tls is not None:
            # The handshake waits for the connection's own thread (Handler.setup): a client
            # that connects and stays silent must not hold up the accepting thread.
            sock = self.fake._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        self.fake._connection_opened(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        try:
            super().shutdown_request(request)
        finally:
            self.fake._connection_closed(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A caller hanging up mid-answer is what faults provoke, and a client refusing the
        # certificate is what TLS tests provoke: neither is worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError | ssl.SSLError):
            return
        super().handle_error(request, client_address)


def _handler_for(fake: FakeUpstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle's algorithm the second
        # waits for the client's delayed ACK (40 ms), which no real API server adds.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def setup(self) -> None:
            if isinstance(self.request, ssl.SSLSocket):
                self.request.settimeout(10)  # a handshake that never completes ends
                self.request.do_handshake()
                self.request.settimeout(None)
            super().setup()

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = None
            headers = {key.lower(): value for key, value in self.headers.items()}
            recorded = RecordedRequest(self.path, headers, body, time.monotonic())
            fake._record(recorded)
            try:
                self._answer(recorded, headers, body)
            except ConnectionError:
                # The caller hung up while the answer was being written.
                fake._abandon(recorded)
                self.close_connection = True
            finally:
                fake._finished()

        def _answer(self, recorded: RecordedRequest, headers: dict[str, str], body: Any) -> None:
            fault = fake._next_fault(body) or Fault()
            held = fault.until is None or self._wait(0.0, fault.until)
            if not held or not self._wait(fake.latency + fault.delay + _asked_delay(body)):
                fake._abandon(recorded)
                self.close_connection = True
                return
            if fault.reset:
                self._reset()
                return
            status, normal = fake.answer(self.path, headers, body)
            if fault.mutate is not None and status == 200:
                normal = fault.mutate(normal)
            payload: Any = normal
            if fault.body is not None or fault.status != 200:
                status = fault.status
                payload = fault.body if fault.body is not None else normal
            content_type = fault.content_type
            if isinstance(payload, str):  # the server's own plain-text answer (TEI's axum 422)
                payload, content_type = payload.encode(), "text/plain; charset=utf-8"
            content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            padding = max(0, fault.pad_to - len(content)) if fault.pad_to is not None else 0
            chunks = _chunks(content, padding)
            length = len(content) + padding
            if fault.gzip:
                # Compressed whole before the headers, to announce its length; even a
                # gzip bomb is small once compressed.
                compressed = _gzip(chunks)
                chunks, length = iter((compressed,)), len(compressed)
            self.send_response(status)
            self.send_header("content-type", content_type)
            if fault.gzip:
                self.send_header("content-encoding", "gzip")
            if fault.chunked:
                self.send_header("transfer-encoding", "chunked")
            else:
                self.send_header("content-length", str(length))
            for key, value in fault.headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self._write_body(chunks, fault, recorded):
                recorded.answered = True

        def _write_body(self, chunks: Iterator[bytes], fault: Fault, recorded: RecordedRequest) -> bool:
            """Write the body as the fault says; True if all of it went out."""
            limit = fault.reset_after_bytes
            step, pause = fault.trickle if fault.trickle is not None else (0, 0.0)
            for chunk in chunks:
                for piece in _pieces(chunk, step):
                    if pause and recorded.body_bytes_sent and not self._wait(pause):
                        fake._abandon(recorded)
                        self.close_connection = True
                        return False
                    # A chunk's size line announces the whole piece, even if the reset cuts it.
                    sent = piece if limit is None else piece[: limit - recorded.body_bytes_sent]
                    self.wfile.write(b"%x\r\n%s" % (len(piece), sent) if fault.chunked else sent)
                    recorded.body_bytes_sent += len(sent)
                    if limit is not None and recorded.body_bytes_sent >= limit:
                        self._reset()
                        return False
                    if fault.chunked:
                        self.wfile.write(b"\r\n")
            if limit is not None:
                self._reset()
                return False
            if fault.chunked:
                self.wfile.write(b"0\r\n\r\n")  # the last chunk: the body is complete
            return True

        def _wait(self, seconds: float, until: threading.Event | None = None) -> bool:
            """Sleep `seconds` (with `until`: until it is set), but notice a caller that hangs
            up meanwhile (False then)."""
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0 if until is None else not until.is_set():
                step = 0.02 if until is not None else min(left, 0.02)
                readable, _, _ = select.select([self.connection], [], [], step)
                if readable:
                    try:
                        # The raw socket's peek: an SSLSocket takes no flags (and for
                        # noticing a hang-up, raw bytes tell as much as decrypted ones).
                        if not socket.socket.recv(self.connection, 1, socket.MSG_PEEK):
                            return False
                    except OSError:  # reset by the caller
                        return False
            return True

        def _reset(self) -> None:
            # SO_LINGER 0 makes close() send a TCP RST rather than a clean FIN.
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            self.close_connection = True
            self.connection.close()

    return Handler


def _chunks(content: bytes, padding: int) -> Iterator[bytes]:
    """The body, then `padding` bytes of whitespace in 64 KiB pieces of one shared string."""
    yield content
    while padding > 0:
        piece = _PADDING if padding >= len(_PADDING) else _PADDING[:padding]
        yield piece
        padding -= len(piece)


def _gzip(chunks: Iterator[bytes]) -> bytes:
    """The chunks gzip-compressed, fed through one compressor (no whole decoded body in memory)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [compressor.compress(chunk) for chunk in chunks]
    parts.append(compressor.flush())
    return b"".join(parts)


def _pieces(chunk: bytes, step: int) -> Iterator[bytes]:
    if not step:
        if chunk:
            yield chunk
        return
    for start in range(0, len(chunk), step):
        yield chunk[start : start + step]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    parser.add_argument("--models", default="qwen3-rerank", help="comma-separated model names")
    parser.add_argument(
        "--format", default="dashscope", choices=FORMATS, help="the wire format spoken (see above)"
    )
    parser.add_argument(
        "--logits", "--raw-scores", action="store_true", help="answer raw logits instead of scores in [0, 1]"
    )
    parser.add_argument(
        "--no-usage", action="store_true", help="cohere and voyage: answer without a token count"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=TEI_MAX_BATCH, help="tei: most texts a call (more: 413)"
    )
    parser.add_argument("--gzip", action="store_true", help="gzip-encode every answer")
    parser.add_argument("--chunked", action="store_true", help="send every answer chunked")
    parser.add_argument("--tls-cert", default=None, help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--tls-key", default=None, help="the PEM private key of --tls-cert")
    args = parser.parse_args()
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    fake = FakeUpstream(
        args.host,
        args.port,
        args.api_key,
        tuple(args.models.split(",")),
        args.latency,
        record=False,
        tls=tls,
        format=args.format,
        logits=args.logits,
        usage=not args.no_usage,
        max_batch=args.max_batch_size,
    )
    if args.gzip or args.chunked:
        fake.always(Fault(gzip=args.gzip, chunked=args.chunked))
    print(f"fake upstream ({fake.format}) listening on {fake.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        fake._server.serve_forever()


if __name__ == "__main__":
    main()
