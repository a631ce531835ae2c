"""The upstream backend: a hosted rerank HTTP API behind the gRPC contract."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from rerank_service.backends.upstream import errors
from rerank_service.backends.upstream.compatible import DashScopeCompatible
from rerank_service.backends.upstream.dashscope import DashScopeNative
from rerank_service.backends.upstream.dialect import Dialect, MalformedResponse, parse_error_body
from rerank_service.backends.upstream.transport import UpstreamReply, UpstreamTransport
from rerank_service.chunking import CallLimits
from rerank_service.config import Settings
from rerank_service.domain import (
    BackendRequest,
    BackendResult,
    CallContext,
    ModelInfo,
    ServiceError,
)
from rerank_service.secret import Secret

DIALECTS: dict[str, type[DashScopeNative] | type[DashScopeCompatible]] = {
    "dashscope": DashScopeNative,
    "compatible": DashScopeCompatible,
}


@dataclass(frozen=True, slots=True)
class _UpstreamModel:
    documents_per_call: int
    tokens_per_call: int
    max_query_tokens: int
    honours_instruct: bool


# What the hosted API documents for its models; other names get the configured limits.
_KNOWN_MODELS: dict[str, _UpstreamModel] = {
    "qwen3-rerank": _UpstreamModel(500, 120_000, 4000, True),
    "qwen3-vl-rerank": _UpstreamModel(100, 120_000, 8000, True),
    "gte-rerank-v2": _UpstreamModel(500, 30_000, 4000, False),
}


class UpstreamBackend:
    """Forwards each request to the configured rerank HTTP API."""

    def __init__(
        self,
        dialect: Dialect,
        transport_factory: Callable[[], UpstreamTransport],
        models: list[ModelInfo],
        call_limits: dict[str, CallLimits],
        api_key: Secret | None,
        pass_through: bool,
        secrets: list[Secret],
    ) -> None:
        self._dialect = dialect
        self._transport_factory = transport_factory
        self._transport: UpstreamTransport | None = None
        self._models = models
        self._call_limits = call_limits
        self._api_key = api_key
        self._pass_through = pass_through
        self._secrets = secrets

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamBackend:
        models, call_limits = [], {}
        configured = _UpstreamModel(
            settings.upstream_documents_per_call,
            settings.upstream_tokens_per_call,
            settings.max_query_tokens,
            True,
        )
        for name in settings.upstream_models:
            known = _KNOWN_MODELS.get(name, configured)
            models.append(
                ModelInfo(
                    name=name,
                    # The service splits larger calls into chunks, so its own limit applies.
                    max_documents=settings.max_documents,
                    max_query_tokens=min(known.max_query_tokens, settings.max_query_tokens),
                    supports_instruct=known.honours_instruct,
                    backend="upstream",
                )
            )
            call_limits[name] = CallLimits(
                max_documents=min(known.documents_per_call, settings.upstream_documents_per_call),
                max_tokens=min(known.tokens_per_call, settings.upstream_tokens_per_call),
            )

        def transport_factory() -> UpstreamTransport:
            return UpstreamTransport(
                settings.upstream_url, settings.upstream_timeout, settings.upstream_max_connections
            )

        return cls(
            dialect=DIALECTS[settings.upstream_dialect](),
            transport_factory=transport_factory,
            models=models,
            call_limits=call_limits,
            api_key=settings.upstream_api_key,
            pass_through=settings.pass_through,
            secrets=settings.secrets(),
        )

    @property
    def ready(self) -> bool:
        return self._transport is not None

    def models(self) -> list[ModelInfo]:
        return list(self._models)

    def call_limits(self, model: str) -> CallLimits:
        return self._call_limits[model]

    async def start(self) -> None:
        if self._transport is None:
            self._transport = self._transport_factory()

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
            self._transport = None

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        if self._transport is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "upstream backend is not started")
        token = self._credentials(context)
        reply = await self._transport.post_json(
            self._dialect.path, self._dialect.build_body(request), token, context.deadline
        )
        body = _decode_json(reply)
        if not 200 <= reply.status < 300:
            raise errors.from_http_status(
                reply.status,
                parse_error_body(body),
                reply.headers.get("retry-after"),
                self._pass_through,
                self._secrets + ([token] if token is not None else []),
            )
        if body is _NOT_JSON:
            raise errors.not_json(reply.status, reply.headers.get("content-type"))
        try:
            return self._dialect.parse_result(body, request)
        except MalformedResponse as exc:
            request_id = parse_error_body(body).request_id
            raise errors.malformed(str(exc), request_id) from None

    def _credentials(self, context: CallContext) -> Secret | None:
        if not self._pass_through:
            return self._api_key
        if context.bearer_token is None:
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED,
                "this service passes callers' credentials to the upstream: send "
                "'authorization: Bearer <upstream API key>' metadata",
                reason="MISSING_CREDENTIALS",
            )
        return context.bearer_token


_NOT_JSON: Any = object()


def _decode_json(reply: UpstreamReply) -> Any:
    try:
        return json.loads(reply.content)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON
