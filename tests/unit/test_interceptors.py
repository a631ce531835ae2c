"""Interceptors wrap every kind of RPC handler, so no RPC shape can skip auth or the log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.grpc.interceptors import UNDECODABLE, _rewrap


async def answer_once(request: Any, context: Any) -> Any:
    return "original"


async def answer_stream(request: Any, context: Any) -> AsyncIterator[Any]:
    yield "original"


async def wrapped_once(request: Any, context: Any) -> Any:
    return "wrapped"


async def wrapped_stream(request: Any, context: Any) -> AsyncIterator[Any]:
    yield "wrapped"


@pytest.mark.parametrize(
    ("factory", "attribute", "behavior", "expected"),
    [
        (grpc.unary_unary_rpc_method_handler, "unary_unary", answer_once, wrapped_once),
        (grpc.stream_unary_rpc_method_handler, "stream_unary", answer_once, wrapped_once),
        (grpc.unary_stream_rpc_method_handler, "unary_stream", answer_stream, wrapped_stream),
        (grpc.stream_stream_rpc_method_handler, "stream_stream", answer_stream, wrapped_stream),
    ],
)
def test_every_handler_kind_gets_the_wrapped_behaviour(
    factory: Any, attribute: str, behavior: Any, expected: Any
) -> None:
    handler = factory(behavior, request_deserializer=bytes, response_serializer=bytes)

    rewrapped = _rewrap(handler, lambda _: wrapped_once, lambda _: wrapped_stream)

    assert getattr(rewrapped, attribute) is expected
    assert rewrapped.request_deserializer is not None
    assert rewrapped.request_deserializer(b"ab") == b"ab"  # the same parser, made tolerant
    assert rewrapped.response_serializer is bytes


def test_a_message_that_does_not_parse_becomes_the_undecodable_marker() -> None:
    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
        wrapped_once, request_deserializer=rerank_pb2.RerankRequest.FromString
    )

    parse = _rewrap(handler, lambda b: b, lambda b: b).request_deserializer

    assert parse is not None
    assert parse(b"\x0a\x02\xff\xfe") is UNDECODABLE  # field 1 (model): invalid UTF-8
    assert parse(rerank_pb2.RerankRequest(model="m").SerializeToString()).model == "m"
