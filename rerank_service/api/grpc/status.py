"""ServiceError → gRPC status with google.rpc error details, in one place."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from rerank_service.core.domain import ServiceError
from rerank_service.pipeline.record import DEPLOYMENT_KEY, REQUEST_ID_KEY

ERROR_DOMAIN = "rerank-service"

Metadata = tuple[tuple[str, str | bytes], ...]

# The longest wait a RetryInfo says: a day. A longer one (a cool-down configured at a year)
# tells a caller nothing more, and a Duration's milliseconds must fit an int64.
MAX_RETRY_DELAY = 86_400.0


def retry_delay_ms(retry_after: float) -> int:
    """`retry_after` seconds as RetryInfo's milliseconds: within [0, MAX_RETRY_DELAY]."""
    return round(min(max(retry_after, 0.0), MAX_RETRY_DELAY) * 1000)


def error_metadata(error: ServiceError, request_id: str) -> Metadata:
    """The status details (`grpc-status-details-bin`) and the request id, as trailing metadata."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    for detail in _details(error):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    metadata: Metadata = (*rpc_status.to_status(status).trailing_metadata, (REQUEST_ID_KEY, request_id))
    if error.deployment:
        metadata += ((DEPLOYMENT_KEY, error.deployment),)
    if error.code is grpc.StatusCode.UNAVAILABLE and _decided(error.reason):
        metadata += _NO_TRANSPARENT_RETRY
    return metadata


# gRPC clients' retry policies retry UNAVAILABLE at once; an UNAVAILABLE the server
# answered after calling the upstream (its own retries done, or the deployment down) or
# after asking the limits store would only multiply the load on what is failing: such
# answers tell the client's gRPC not to retry them (the caller decides, RetryInfo in hand).
_NO_TRANSPARENT_RETRY: Metadata = (("grpc-retry-pushback-ms", "-1"),)


def _decided(reason: str | None) -> bool:
    return reason is not None and (reason.startswith("UPSTREAM_") or reason == "LIMITS_STORE_UNAVAILABLE")


def _details(error: ServiceError) -> list[Message]:
    details: list[Message] = []
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
    if error.quota_violations:
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
                    for v in error.quota_violations
                ]
            )
        )
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(retry_delay_ms(error.retry_after))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if error.reason:
        details.append(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
        )
    return details
