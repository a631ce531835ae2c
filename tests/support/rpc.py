"""Helpers to call the service and read gRPC errors and their google.rpc details."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rerank.v1 import rerank_pb2

from tests.support.fault_scenarios import rerank_request


def request(**fields: Any) -> rerank_pb2.RerankRequest:
    """A valid RerankRequest, with `fields` replaced (the fault scenarios' own)."""
    return rerank_request(**fields)


def expect_error(call: Callable[[], Any]) -> grpc.RpcError:
    """Run `call`, which must fail with a gRPC error; return the error."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code()


def details_of(error: grpc.RpcError) -> str:
    return error.details() or ""


def trailing(error: grpc.RpcError) -> dict[str, Any]:
    return {item.key: item.value for item in error.trailing_metadata() or ()}


def _unpacked(error: grpc.RpcError, kind: Any) -> list[Any]:
    status = rpc_status.from_call(error)
    if status is None:
        return []
    found = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """field → description, from the google.rpc.BadRequest detail."""
    return {
        violation.field: violation.description
        for bad_request in _unpacked(error, error_details_pb2.BadRequest)
        for violation in bad_request.field_violations
    }


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    infos = _unpacked(error, error_details_pb2.ErrorInfo)
    return infos[0] if infos else None


def retry_delay(error: grpc.RpcError) -> float | None:
    infos = _unpacked(error, error_details_pb2.RetryInfo)
    return infos[0].retry_delay.ToMilliseconds() / 1000 if infos else None
