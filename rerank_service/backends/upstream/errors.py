"""The one place where upstream failures become gRPC status codes.

HTTP statuses, transport errors and malformed bodies all land here, so a reader can
check every mapping docs/ERRORS.md promises against a single file.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import ssl
import time

import grpc
import httpx

from rerank_service.backends.upstream.dialect import UpstreamErrorBody
from rerank_service.config.secret import Secret, redact
from rerank_service.core.domain import FailureKind, ServiceError

# ErrorInfo reasons (docs/ERRORS.md) that retry.py tells apart.
UNAVAILABLE = "UPSTREAM_UNAVAILABLE"  # unreachable, reset, a 5xx
TIMEOUT = "UPSTREAM_TIMEOUT"
BAD_RESPONSE = "UPSTREAM_BAD_RESPONSE"

# Upstream text passed on to callers is cut to this many characters.
MAX_UPSTREAM_TEXT = 300
# A Retry-After beyond this is treated as this: callers should not wait for days.
MAX_RETRY_AFTER = 3600.0
# The request's own fault, whichever deployment it went to: 498 is Cohere's "a request or
# response contains a deny-listed token" (the caller's content; no other API answers it).
REJECTED_STATUSES = frozenset({400, 413, 422, 498})


def server_fault(status: int) -> bool:
    """The upstream failed, not the request: a 5xx, or a 424 Failed Dependency (the server's
    own backend failed: TEI's and TGI's answer when inference fails). No rerank API answers
    424 for a fault of the request, so it is the server's for every format."""
    return 500 <= status < 600 or status == 424  # aiohttp reads any three digits: a 600-999 is no 5xx


def from_http_status(
    status: int,
    body: UpstreamErrorBody,
    retry_after_header: str | None,
    pass_through: bool,
    secrets: list[Secret],
) -> ServiceError:
    """Map a non-2xx upstream answer to the status the caller should see."""
    detail = _describe(status, body, secrets)
    metadata = {"upstream_status": str(status)}
    if body.code:
        metadata["upstream_code"] = _clean(body.code, secrets)
    if body.request_id:
        metadata["upstream_request_id"] = _clean(body.request_id, secrets)

    def error(
        code: grpc.StatusCode,
        reason: str,
        kind: FailureKind = FailureKind.REQUEST,
        retry_after: float | None = None,
    ) -> ServiceError:
        return ServiceError(
            code,
            detail,
            reason=reason,
            retry_after=retry_after,
            metadata=metadata,
            upstream_request_id=metadata.get("upstream_request_id"),
            kind=kind,
        )

    # The request's (or its credentials') fault: another deployment would refuse it too.
    if status in REJECTED_STATUSES:
        return error(grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST")
    if status in (401, 403):
        if not pass_through:
            # The deployment's own key failed: the caller can do nothing about it, and another
            # deployment (its own key, maybe another provider) may answer.
            return error(grpc.StatusCode.INTERNAL, "UPSTREAM_AUTH_FAILED", FailureKind.DEPLOYMENT)
        code = grpc.StatusCode.UNAUTHENTICATED if status == 401 else grpc.StatusCode.PERMISSION_DENIED
        return error(code, "UPSTREAM_AUTH_FAILED")
    if status == 404:
        # With the deployment's own key, the model id and URL it sends are the operator's (a
        # caller names only a route the service serves): a 404 says the deployment is wrong (its
        # model retired or misspelt, a wrong path), so another deployment may answer. Still
        # NOT_FOUND should none: the caller is told what the upstream said. Pass-through: it
        # may be about the caller's own account, which another deployment would not change.
        kind = FailureKind.REQUEST if pass_through else FailureKind.DEPLOYMENT
        return error(grpc.StatusCode.NOT_FOUND, "UPSTREAM_NOT_FOUND", kind)
    if status == 408:
        return error(grpc.StatusCode.DEADLINE_EXCEEDED, TIMEOUT, FailureKind.DEPLOYMENT)
    if status == 429:
        return error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UPSTREAM_RATE_LIMITED",
            FailureKind.DEPLOYMENT,
            parse_retry_after(retry_after_header),
        )
    if server_fault(status):
        return error(
            grpc.StatusCode.UNAVAILABLE,
            UNAVAILABLE,
            FailureKind.DEPLOYMENT,
            parse_retry_after(retry_after_header),
        )
    # Any other status (a 1xx, a 3xx, an unexpected 4xx, 600 and up): not the rerank API it
    # should be, now.
    return error(grpc.StatusCode.INTERNAL, "UPSTREAM_UNEXPECTED_STATUS", FailureKind.DEPLOYMENT)


def from_transport(exc: httpx.HTTPError, upstream_timed_out_by_caller: bool) -> ServiceError:
    """Map a transport failure (no HTTP status) to a status. aiohttp's failures come here
    named as httpx's transport errors (client/failures.py)."""
    if isinstance(exc, httpx.PoolTimeout):
        # Our own full pool held the call, whichever bound ended its wait (docs/ERRORS.md):
        # the caller's deadline too. One that deadline cut with no wait for the pool is the
        # caller's timeout instead (client/failures.py).
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            "no free upstream connection in time (connection pool exhausted)",
            reason="UPSTREAM_POOL_EXHAUSTED",
            kind=FailureKind.DEPLOYMENT,
        )
    if isinstance(exc, httpx.TimeoutException):
        # A connect timeout: no connection in time.
        return timed_out(upstream_timed_out_by_caller, unreachable=isinstance(exc, httpx.ConnectTimeout))
    rejected = _rejected_certificate(exc)
    if rejected is not None:
        # The upstream (or something posing as it) is not who it says: say so, as an
        # operator must fix the trust (upstream-ca-file) or the upstream's certificate.
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"upstream TLS certificate rejected: {rejected}",
            reason=UNAVAILABLE,
            unreachable=True,
            kind=FailureKind.DEPLOYMENT,
        )
    # Connect errors, resets, protocol errors: the upstream is not reachable right now.
    # A proxy that refused the tunnel says what it answered (client/failures.py writes
    # that text from its status alone: no credential of the proxy URL is in it).
    what = str(exc) if isinstance(exc, httpx.ProxyError) else type(exc).__name__
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"upstream unreachable: {what}",
        reason=UNAVAILABLE,
        # No connection at all (refused, unroutable, a failed handshake, a proxy that would
        # not open a tunnel to it), as opposed to one that broke while a request was on it.
        unreachable=isinstance(exc, httpx.ConnectError | httpx.ProxyError),
        kind=FailureKind.DEPLOYMENT,
    )


def _rejected_certificate(exc: BaseException) -> str | None:
    """Why the TLS handshake refused the upstream's certificate, if that is what `exc` is.

    The transport error is chained to the ssl error underneath (client/failures.py).
    """
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is two or three deep; never walk a cycle
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason or "certificate verify failed")
        seen = seen.__cause__ or seen.__context__
    return None


def timed_out(by_caller_deadline: bool, unreachable: bool = False) -> ServiceError:
    why = "the call's deadline" if by_caller_deadline else "the upstream timeout"
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"upstream did not answer within {why}",
        reason=TIMEOUT,
        unreachable=unreachable,
        # The router checks the caller's deadline itself before it tries another deployment.
        kind=FailureKind.DEPLOYMENT,
    )


def connect_timed_out(connect_timeout: float) -> ServiceError:
    """No connection opened within the connect timeout: unreachable, as a refused connection
    is (retried, the call falls over, it counts toward the deployment being down)."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"upstream unreachable: no connection within --upstream-connect-timeout ({connect_timeout:g} s)",
        reason=UNAVAILABLE,
        unreachable=True,
        kind=FailureKind.DEPLOYMENT,
    )


def probe_timed_out(probe_timeout: float | None, unreachable: bool = False) -> ServiceError:
    """A probe of a down deployment got no answer within its own bound: the deployment is
    still down. Not DEADLINE_EXCEEDED: the caller's deadline is not spent, and the route
    may try another deployment within it (UNAVAILABLE, as for an unreachable upstream)."""
    bound = "" if probe_timeout is None else f" ({probe_timeout:g} s)"
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"upstream is down and did not answer its probe within --upstream-breaker-probe-timeout{bound}",
        reason=UNAVAILABLE,
        unreachable=unreachable,
        kind=FailureKind.DEPLOYMENT,
    )


def not_json(status: int, content_type: str | None, secrets: list[Secret]) -> ServiceError:
    # The content type is the upstream's text too: a reflecting proxy may put a key in it.
    shown = _clean(content_type, secrets) if content_type else "none"
    return _unusable_body(f"upstream answered {status} with a body that is not JSON (content-type {shown})")


def malformed(reason_text: str, request_id: str | None) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INTERNAL,
        # Cut as other upstream text is: the reason may quote a value of the answer.
        _clean(f"upstream response is malformed: {reason_text}", []),
        reason=BAD_RESPONSE,
        kind=FailureKind.DEPLOYMENT,
        metadata={"upstream_request_id": request_id} if request_id else {},
        upstream_request_id=request_id,
    )


def undecodable(why: str) -> ServiceError:
    """A body its own headers misdescribe: corrupt or cut-short gzip, a coding not asked for."""
    return _unusable_body(f"upstream response body cannot be decoded: {why}")


def not_http(why: str) -> ServiceError:
    """An answer whose head the HTTP/1.1 parser refused (a bad status line, a header too
    long, one too many, a duplicate Content-Length, bytes after a whole answer): an
    answer came, so the upstream is reachable; the same one again would be refused too.
    `why`: a fixed phrase (client/failures.py), never the parser's message, which quotes
    the upstream's bytes."""
    return _unusable_body(f"upstream answer is not valid HTTP/1.1: {why}")


def too_large(limit: int) -> ServiceError:
    return _unusable_body(f"upstream response is larger than {limit} bytes")


def _unusable_body(message: str) -> ServiceError:
    """A body the service cannot read at all (as opposed to a readable one that breaks the
    format: `malformed`): this deployment's fault, UNAVAILABLE so the caller may retry."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE, message, reason=BAD_RESPONSE, kind=FailureKind.DEPLOYMENT
    )


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds (delta-seconds or an HTTP date), within [0, MAX_RETRY_AFTER]."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:  # "-0000" parses as naive; HTTP dates are always GMT
                when = when.replace(tzinfo=datetime.UTC)
            seconds = when.timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):  # OverflowError: a year or offset past C's
            return None
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def _describe(status: int, body: UpstreamErrorBody, secrets: list[Secret]) -> str:
    parts = [f"upstream answered HTTP {status}"]
    if body.code:
        parts.append(body.code)
    text = ": ".join(parts)
    if body.message:
        text += f": {body.message}"
    if body.request_id:
        text += f" (upstream request_id {body.request_id})"
    return _clean(text, secrets)


def _clean(text: str, secrets: list[Secret]) -> str:
    """Upstream text as the caller may see it: no secret, at most MAX_UPSTREAM_TEXT characters,
    and valid UTF-8 (a header's undecodable bytes arrive as lone surrogates, which neither a
    gRPC status nor its metadata can carry)."""
    text = redact(text, secrets).encode("utf-8", "replace").decode("utf-8")
    if len(text) > MAX_UPSTREAM_TEXT:
        text = text[: MAX_UPSTREAM_TEXT - 1] + "…"
    return text
