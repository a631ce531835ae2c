"""ServiceError → trailing metadata with google.rpc status details and the request id."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from rerank_service.api.grpc.status import ERROR_DOMAIN, error_metadata
from rerank_service.core.domain import FieldViolation, ServiceError, invalid_argument, model_not_found
from rerank_service.pipeline.record import REQUEST_ID_KEY


def decode(metadata: tuple[tuple[str, str | bytes], ...]) -> status_pb2.Status:
    entries = dict(metadata)
    raw = entries["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    status = status_pb2.Status()
    status.ParseFromString(raw)
    return status


def unpack_bad_request(detail: any_pb2.Any) -> error_details_pb2.BadRequest:
    message = error_details_pb2.BadRequest()
    assert detail.Unpack(message)
    return message


def unpack_retry_info(detail: any_pb2.Any) -> error_details_pb2.RetryInfo:
    message = error_details_pb2.RetryInfo()
    assert detail.Unpack(message)
    return message


def unpack_error_info(detail: any_pb2.Any) -> error_details_pb2.ErrorInfo:
    message = error_details_pb2.ErrorInfo()
    assert detail.Unpack(message)
    return message


def test_metadata_holds_status_details_then_request_id() -> None:
    metadata = error_metadata(ServiceError(grpc.StatusCode.INTERNAL, "boom"), "req-123")
    assert [key for key, _ in metadata] == ["grpc-status-details-bin", REQUEST_ID_KEY]
    assert dict(metadata)[REQUEST_ID_KEY] == "req-123"
    assert REQUEST_ID_KEY == "x-request-id"


def test_status_carries_code_number_and_message() -> None:
    status = decode(error_metadata(ServiceError(grpc.StatusCode.NOT_FOUND, "no such model"), "r"))
    assert status.code == 5
    assert status.message == "no such model"


def test_plain_error_has_no_details() -> None:
    status = decode(error_metadata(ServiceError(grpc.StatusCode.INTERNAL, "boom"), "r"))
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    assert list(status.details) == []


def test_violations_become_a_bad_request() -> None:
    error = invalid_argument(
        [FieldViolation("query", "must not be empty"), FieldViolation("documents[2]", "is blank")]
    )
    status = decode(error_metadata(error, "req-1"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(status.details) == 1
    assert status.details[0].Is(error_details_pb2.BadRequest.DESCRIPTOR)
    bad_request = unpack_bad_request(status.details[0])
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("query", "must not be empty"),
        ("documents[2]", "is blank"),
    ]


def test_retry_after_becomes_retry_info_in_milliseconds() -> None:
    error = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", retry_after=2.5)
    status = decode(error_metadata(error, "r"))
    assert len(status.details) == 1
    retry_info = unpack_retry_info(status.details[0])
    assert retry_info.retry_delay.ToMilliseconds() == 2500
    assert retry_info.retry_delay.seconds == 2
    assert retry_info.retry_delay.nanos == 500_000_000


def test_zero_retry_after_still_produces_retry_info() -> None:
    error = ServiceError(grpc.StatusCode.UNAVAILABLE, "down", retry_after=0.0)
    status = decode(error_metadata(error, "r"))
    assert len(status.details) == 1
    assert unpack_retry_info(status.details[0]).retry_delay.ToMilliseconds() == 0


def test_reason_becomes_error_info_with_domain_and_metadata() -> None:
    error = model_not_found("gpt-rerank", ["qwen3-rerank", "gte-rerank-v2"])
    status = decode(error_metadata(error, "r"))
    assert len(status.details) == 1
    info = unpack_error_info(status.details[0])
    assert info.reason == "MODEL_NOT_FOUND"
    assert info.domain == ERROR_DOMAIN == "rerank-service"
    assert dict(info.metadata) == {"model": "gpt-rerank", "served_models": "qwen3-rerank,gte-rerank-v2"}


def test_all_three_details_are_packed_in_order() -> None:
    error = ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "rate limited",
        reason="UPSTREAM_RATE_LIMITED",
        violations=[FieldViolation("top_n", "too big")],
        retry_after=1.0,
        metadata={"upstream_status": "429"},
    )
    status = decode(error_metadata(error, "req-xyz"))
    assert [detail.type_url for detail in status.details] == [
        "type.googleapis.com/google.rpc.BadRequest",
        "type.googleapis.com/google.rpc.RetryInfo",
        "type.googleapis.com/google.rpc.ErrorInfo",
    ]
    assert unpack_bad_request(status.details[0]).field_violations[0].field == "top_n"
    assert unpack_retry_info(status.details[1]).retry_delay.seconds == 1
    info = unpack_error_info(status.details[2])
    assert info.reason == "UPSTREAM_RATE_LIMITED"
    assert dict(info.metadata) == {"upstream_status": "429"}
