"""The service's status codes as HTTP statuses, and as the hosted API's error codes.

One mapping for every HTTP route: the same failure gives the same status whatever the
wire format; the DashScope formats also carry their error `code` string.
"""

from __future__ import annotations

import math

import grpc

from rerank_service.core.domain import ServiceError

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,  # the client went away (nginx's convention)
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# DashScope's error codes (those its SDK names, `dashscope.v2.errors.ErrorCode`) by HTTP status.
_DASHSCOPE_CODE = {
    400: "InvalidParameter",
    401: "InvalidApiKey",
    403: "AccessDenied",
    404: "NotFound",
    405: "MethodNotAllowed",
    408: "RequestTimeOut",
    409: "Conflict",
    411: "LengthRequired",
    413: "RequestTooLarge",
    415: "UnsupportedMediaType",
    429: "Throttling",
    499: "RequestCancelled",
    501: "NotImplemented",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


def http_status(error: ServiceError) -> int:
    return _HTTP_STATUS.get(error.code, 500)


def dashscope_code(status: int, error: ServiceError | None = None) -> str:
    if error is not None and error.reason == "MODEL_NOT_FOUND":
        return "Model.NotExist"
    return _DASHSCOPE_CODE.get(status, "InternalError")


# The longest wait a refusal says: a day, as gRPC's RetryInfo (api/grpc/status.py). A longer
# one (a cool-down configured at a year) tells a client nothing more.
MAX_RETRY_AFTER = 86_400.0


def retry_after_seconds(error: ServiceError) -> float | None:
    """The error's wait, within [0, MAX_RETRY_AFTER]; None when it gives none."""
    if error.retry_after is None:
        return None
    return min(max(error.retry_after, 0.0), MAX_RETRY_AFTER)


def retry_after_header(error: ServiceError) -> str | None:
    """`Retry-After` in whole seconds (HTTP has no finer unit), at least 1, at most a day."""
    seconds = retry_after_seconds(error)
    return None if seconds is None else str(max(1, math.ceil(seconds)))
