"""`RerankClient` (blocking) and `AsyncRerankClient` (asyncio) for rerank.v1.RerankService.

Retries of UNAVAILABLE are left to gRPC itself, through the channel's service config
(exponential backoff, at most 4 attempts, only while the call's deadline allows; Rerank
and ListModels, never a stream), so no call is ever retried by hand here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

DEFAULT_MODEL = "qwen3-rerank"

RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                # The unary methods only: a stream that ends UNAVAILABLE may have had items
                # run already, and a replay would run (and bill) each again.
                "name": [
                    {"service": "rerank.v1.RerankService", "method": "Rerank"},
                    {"service": "rerank.v1.RerankService", "method": "ListModels"},
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
CHANNEL_OPTIONS = (
    ("grpc.service_config", RETRY_SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    # No size limit of the client's own (-1): the server bounds both ways (--max-message-bytes,
    # 16 MiB by default). gRPC's 4 MiB receive default would fail an answer the server had
    # already ranked and billed (return_documents=True over large documents).
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # gRPC keeps at most this much of a call's request for re-sending (256 KiB by default) and
    # never retries a larger one; no limit of the client's own here either (-1 would mean none
    # kept, so INT_MAX), or a large Rerank would get 1 attempt where the policy promises 4.
    ("grpc.per_rpc_retry_buffer_size", 2**31 - 1),
)


@dataclass(frozen=True, slots=True)
class BestChunk:
    """A chunked document's best chunk: its index, and its text as document[start:end]."""

    index: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class RankedDocument:
    index: int
    relevance_score: float
    text: str | None = None
    # Long documents: whether it was cut to the window, how many chunks were scored, and
    # (long_documents CHUNK) the chunk its score came from.
    truncated: bool = False
    chunks: int = 1
    best_chunk: BestChunk | None = None


@dataclass(frozen=True, slots=True)
class RerankResult:
    request_id: str
    results: list[RankedDocument]
    total_tokens: int
    # Tokens of the pairs the service's score cache answered (not in total_tokens).
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RerankItemError:
    """A failed RerankStream item: what Rerank would have raised."""

    code: grpc.StatusCode
    message: str
    field_violations: dict[str, str] = field(default_factory=dict)
    retry_delay: float | None = None
    reason: str = ""
    request_id: str = ""
    # ErrorInfo's metadata (docs/ERRORS.md): upstream_status, upstream_code and
    # upstream_request_id of an upstream error; model and served_models of MODEL_NOT_FOUND.
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamAnswer:
    """One RerankStream answer: `result` or `error`, under the id the caller chose."""

    id: str
    result: RerankResult | None = None
    error: RerankItemError | None = None


def build_request(
    query: str,
    documents: Sequence[str],
    model: str,
    top_n: int | None = None,
    instruct: str | None = None,
    return_documents: bool = False,
    long_documents: rerank_pb2.LongDocuments.ValueType = rerank_pb2.LONG_DOCUMENTS_UNSPECIFIED,
    max_tokens_per_doc: int | None = None,
    chunk_overlap_tokens: int | None = None,
) -> rerank_pb2.RerankRequest:
    """`long_documents`: rerank_pb2.LONG_DOCUMENTS_TRUNCATE, _CHUNK or _REJECT (unset: the route's)."""
    request = rerank_pb2.RerankRequest(
        model=model,
        query=query,
        documents=list(documents),
        return_documents=return_documents,
        long_documents=long_documents,
    )
    if top_n is not None:
        request.top_n = top_n
    if instruct is not None:
        request.instruct = instruct
    if max_tokens_per_doc is not None:
        request.max_tokens_per_doc = max_tokens_per_doc
    if chunk_overlap_tokens is not None:
        request.chunk_overlap_tokens = chunk_overlap_tokens
    return request


def to_result(response: rerank_pb2.RerankResponse) -> RerankResult:
    return RerankResult(
        request_id=response.request_id,
        results=[
            RankedDocument(
                index=result.index,
                relevance_score=result.relevance_score,
                text=result.document.text if result.HasField("document") else None,
                truncated=result.truncated,
                chunks=result.chunks or 1,
                best_chunk=BestChunk(result.best_chunk.index, result.best_chunk.start, result.best_chunk.end)
                if result.HasField("best_chunk")
                else None,
            )
            for result in response.output.results
        ],
        total_tokens=response.usage.total_tokens,
        cached_tokens=response.usage.cached_tokens,
    )


def to_answer(response: rerank_pb2.RerankStreamResponse) -> StreamAnswer:
    if response.WhichOneof("result") == "response":
        return StreamAnswer(id=response.id, result=to_result(response.response))
    error = response.error
    return StreamAnswer(
        id=response.id,
        error=RerankItemError(
            code=_status_code(error.code),
            message=error.message,
            field_violations={v.field: v.description for v in error.field_violations},
            retry_delay=error.retry_delay.ToMilliseconds() / 1000 if error.HasField("retry_delay") else None,
            reason=error.reason,
            request_id=error.request_id,
            metadata=dict(error.metadata),
        ),
    )


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """field → description from the google.rpc.BadRequest detail of a failed call.

    Needs googleapis-common-protos (`pip install rerank-service-client[details]`).
    """
    try:
        from google.rpc import error_details_pb2, status_pb2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("field_violations needs: pip install 'rerank-service-client[details]'") from exc
    # Blocking calls give (key, value) named tuples, asyncio calls a Metadata of pairs.
    pairs: Iterable[Any] = error.trailing_metadata() or ()
    for key, value in (tuple(pair) for pair in pairs):
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            violations: dict[str, str] = {}
            for detail in status.details:
                bad_request = error_details_pb2.BadRequest()
                if detail.Unpack(bad_request):
                    violations.update({v.field: v.description for v in bad_request.field_violations})
            return violations
    return {}


def _status_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The bearer header for `api_key` without its surrounding whitespace (the newline of a key
    read from a file), as the Go, Node and Java clients send it. Raises ValueError, never quoting
    the key, for one no header can carry: grpc would fail each call INTERNAL "Invalid metadata"."""
    key = (api_key or "").strip()
    if any(not "\x21" <= char <= "\x7e" for char in key):
        raise ValueError(
            "api_key must be printable ASCII (letters, digits, punctuation; no spaces or control characters)"
        )
    return (("authorization", f"Bearer {key}"),) if key else ()


class RerankClient:
    """Blocking client. `with RerankClient("host:50051", api_key=...) as client: ...`"""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        model: str = DEFAULT_MODEL,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._metadata = _metadata(api_key)  # first: a refused key opens no channel
        self._channel = (
            grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        )
        self._stub = rerank_pb2_grpc.RerankServiceStub(self._channel)
        self._timeout = timeout
        self._model = model

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        model: str | None = None,
        top_n: int | None = None,
        instruct: str | None = None,
        return_documents: bool = False,
        timeout: float | None = None,
        long_documents: rerank_pb2.LongDocuments.ValueType = rerank_pb2.LONG_DOCUMENTS_UNSPECIFIED,
        max_tokens_per_doc: int | None = None,
        chunk_overlap_tokens: int | None = None,
    ) -> RerankResult:
        request = build_request(
            query,
            documents,
            model or self._model,
            top_n,
            instruct,
            return_documents,
            long_documents,
            max_tokens_per_doc,
            chunk_overlap_tokens,
        )
        response = self._stub.Rerank(
            request, metadata=self._metadata, timeout=self._timeout if timeout is None else timeout
        )
        return to_result(response)

    def rerank_stream(
        self, requests: Iterable[tuple[str, rerank_pb2.RerankRequest]], timeout: float | None = None
    ) -> Iterator[StreamAnswer]:
        """Answers to (id, request) pairs, in completion order; see `build_request`."""
        items = (rerank_pb2.RerankStreamRequest(id=item_id, request=request) for item_id, request in requests)
        for response in self._stub.RerankStream(items, metadata=self._metadata, timeout=timeout):
            yield to_answer(response)

    def list_models(self) -> list[rerank_pb2.ModelInfo]:
        response = self._stub.ListModels(
            rerank_pb2.ListModelsRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return list(response.models)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RerankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRerankClient:
    """asyncio client. `async with AsyncRerankClient("host:50051", api_key=...) as client: ...`"""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        model: str = DEFAULT_MODEL,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._metadata = _metadata(api_key)  # first: a refused key opens no channel
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        )
        self._stub: Any = rerank_pb2_grpc.RerankServiceStub(self._channel)
        self._timeout = timeout
        self._model = model

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        model: str | None = None,
        top_n: int | None = None,
        instruct: str | None = None,
        return_documents: bool = False,
        timeout: float | None = None,
        long_documents: rerank_pb2.LongDocuments.ValueType = rerank_pb2.LONG_DOCUMENTS_UNSPECIFIED,
        max_tokens_per_doc: int | None = None,
        chunk_overlap_tokens: int | None = None,
    ) -> RerankResult:
        request = build_request(
            query,
            documents,
            model or self._model,
            top_n,
            instruct,
            return_documents,
            long_documents,
            max_tokens_per_doc,
            chunk_overlap_tokens,
        )
        response = await self._stub.Rerank(
            request, metadata=self._metadata, timeout=self._timeout if timeout is None else timeout
        )
        return to_result(response)

    async def rerank_stream(
        self, requests: AsyncIterable[tuple[str, rerank_pb2.RerankRequest]], timeout: float | None = None
    ) -> AsyncIterator[StreamAnswer]:
        async def items() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
            async for item_id, request in requests:
                yield rerank_pb2.RerankStreamRequest(id=item_id, request=request)

        call = self._stub.RerankStream(items(), metadata=self._metadata, timeout=timeout)
        try:
            async for response in call:
                yield to_answer(response)
        finally:
            # Leaving the loop early (break, aclose) must end the call: grpc.aio's task that
            # sends the items keeps it open otherwise, and the server runs (and bills) every
            # item still to come. A no-op once the call has ended.
            call.cancel()

    async def list_models(self) -> list[rerank_pb2.ModelInfo]:
        response = await self._stub.ListModels(
            rerank_pb2.ListModelsRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return list(response.models)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRerankClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
