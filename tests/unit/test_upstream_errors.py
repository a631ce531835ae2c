"""Upstream failures (HTTP statuses, transport errors) mapped to gRPC statuses."""

from __future__ import annotations

import email.utils
import ssl
import time
from datetime import UTC, datetime

import grpc
import httpcore
import httpx
import pytest

from rerank_service.backends.upstream import errors
from rerank_service.backends.upstream.dialect import UpstreamErrorBody
from rerank_service.backends.upstream.errors import (
    MAX_UPSTREAM_TEXT,
    from_http_status,
    from_transport,
    parse_retry_after,
)
from rerank_service.backends.upstream.retry import judge
from rerank_service.config.secret import Secret
from rerank_service.core.domain import FailureKind, ServiceError, not_ready
from rerank_service.core.health import DeploymentHealth, Outcome

SECRET = "sk-upstream-echoed-0123456789"
MASK = "**********"
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def map_status(
    status: int,
    body: UpstreamErrorBody | None = None,
    retry_after: str | None = None,
    pass_through: bool = False,
    secrets: list[Secret] | None = None,
) -> ServiceError:
    return from_http_status(status, body or UpstreamErrorBody(), retry_after, pass_through, secrets or [])


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(time, "time", lambda: NOW)  # errors.py reads time.time()
    return NOW


def http_date(offset_seconds: float) -> str:
    return email.utils.formatdate(NOW + offset_seconds, usegmt=True)


# --- status mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 413, 422])
@pytest.mark.parametrize("pass_through", [False, True])
def test_request_rejections_map_to_invalid_argument(status: int, pass_through: bool) -> None:
    error = map_status(status, pass_through=pass_through)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "UPSTREAM_REJECTED_REQUEST"


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_with_service_key_is_internal(status: int) -> None:
    error = map_status(status, pass_through=False)
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.reason == "UPSTREAM_AUTH_FAILED"


def test_401_in_pass_through_is_unauthenticated() -> None:
    error = map_status(401, pass_through=True)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == "UPSTREAM_AUTH_FAILED"


def test_403_in_pass_through_is_permission_denied() -> None:
    error = map_status(403, pass_through=True)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "UPSTREAM_AUTH_FAILED"


def test_404_is_not_found_and_the_deployments_fault_with_its_own_key() -> None:
    error = map_status(404, pass_through=False)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "UPSTREAM_NOT_FOUND"
    # The model id and URL sent were the operator's: another deployment of the route may answer.
    assert error.kind is FailureKind.DEPLOYMENT


def test_404_in_pass_through_is_not_found_and_the_requests_own() -> None:
    error = map_status(404, pass_through=True)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "UPSTREAM_NOT_FOUND"
    assert error.kind is FailureKind.REQUEST


def test_408_is_deadline_exceeded() -> None:
    error = map_status(408)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason == "UPSTREAM_TIMEOUT"


def test_429_is_resource_exhausted_with_delta_seconds_retry_after() -> None:
    error = map_status(429, retry_after="7")
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "UPSTREAM_RATE_LIMITED"
    assert error.retry_after == 7.0


def test_429_reads_retry_after_from_an_http_date(frozen_clock: float) -> None:
    error = map_status(429, retry_after=http_date(120))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.retry_after == pytest.approx(120.0)


def test_429_without_retry_after_has_none() -> None:
    assert map_status(429).retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_5xx_is_unavailable(status: int) -> None:
    error = map_status(status)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_UNAVAILABLE"


def test_503_carries_retry_after() -> None:
    assert map_status(503, retry_after="3").retry_after == 3.0


@pytest.mark.parametrize("status", [402, 405, 409, 418, 451])
def test_other_4xx_is_internal(status: int) -> None:
    error = map_status(status)
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.reason == "UPSTREAM_UNEXPECTED_STATUS"


@pytest.mark.parametrize("status", [600, 799, 999])
def test_a_status_past_599_is_unexpected_and_no_5xx_to_retry(status: int) -> None:
    error = map_status(status, retry_after="5")  # aiohttp reads any three digits as a status

    verdict = judge(error, caller_deadline_passed=False)
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.reason == "UPSTREAM_UNEXPECTED_STATUS"
    assert error.retry_after is None
    # Not the rerank API's answer: a failure, as a 3xx is (enough in a row eject it), never retried.
    assert (verdict.retryable, verdict.outcome) == (False, Outcome.FAILURE)


@pytest.mark.parametrize("status", [400, 404, 418])
def test_only_429_and_5xx_carry_retry_after(status: int) -> None:
    assert map_status(status, retry_after="5").retry_after is None


# --- message and metadata -----------------------------------------------------------------------


def test_message_includes_upstream_status_code_message_and_request_id() -> None:
    body = UpstreamErrorBody(code="InvalidParameter", message="top_n must be positive", request_id="req-77")
    error = map_status(400, body)
    assert error.message == (
        "upstream answered HTTP 400: InvalidParameter: top_n must be positive (upstream request_id req-77)"
    )


def test_message_without_body_names_the_status() -> None:
    assert map_status(502).message == "upstream answered HTTP 502"


def test_metadata_and_request_id_carry_upstream_details() -> None:
    body = UpstreamErrorBody(code="Throttling", message="slow down", request_id="req-9")
    error = map_status(429, body)
    assert error.metadata == {
        "upstream_status": "429",
        "upstream_code": "Throttling",
        "upstream_request_id": "req-9",
    }
    assert error.upstream_request_id == "req-9"


def test_metadata_without_code_or_request_id_has_only_the_status() -> None:
    error = map_status(500)
    assert error.metadata == {"upstream_status": "500"}
    assert error.upstream_request_id is None


def test_long_upstream_message_is_truncated() -> None:
    error = map_status(400, UpstreamErrorBody(code="Bad", message="x" * 5000))
    assert len(error.message) == MAX_UPSTREAM_TEXT
    assert error.message.endswith("…")
    assert error.message.startswith("upstream answered HTTP 400: Bad: xxx")


def test_message_at_the_limit_is_not_truncated() -> None:
    prefix = "upstream answered HTTP 400: "
    message = "y" * (MAX_UPSTREAM_TEXT - len(prefix))
    error = map_status(400, UpstreamErrorBody(message=message))
    assert error.message == prefix + message
    assert not error.message.endswith("…")


def test_long_upstream_code_in_metadata_is_truncated() -> None:
    error = map_status(400, UpstreamErrorBody(code="C" * 1000))
    assert len(error.metadata["upstream_code"]) == MAX_UPSTREAM_TEXT


def test_secret_echoed_by_the_upstream_is_masked_everywhere() -> None:
    body = UpstreamErrorBody(
        code=f"bad-key-{SECRET}",
        message=f"Incorrect API key provided: {SECRET}. Check {SECRET}",
        request_id=f"req-{SECRET}",
    )
    error = map_status(401, body, secrets=[Secret("other"), Secret(SECRET)])
    assert SECRET not in error.message
    assert error.message.count(MASK) == 4
    assert all(SECRET not in value for value in error.metadata.values())
    assert error.upstream_request_id is not None
    assert SECRET not in error.upstream_request_id
    assert SECRET not in str(error)


def test_secret_at_the_truncation_point_leaves_no_fragment() -> None:
    prefix = "upstream answered HTTP 400: "
    filler = "z" * (MAX_UPSTREAM_TEXT - len(prefix) - 5)
    error = map_status(400, UpstreamErrorBody(message=filler + SECRET), secrets=[Secret(SECRET)])
    assert len(error.message) == MAX_UPSTREAM_TEXT
    assert SECRET[:5] not in error.message


# --- parse_retry_after --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "soon", "Tomorrow at noon", "12abc"])
def test_retry_after_that_is_absent_or_garbage_gives_none(value: str | None) -> None:
    assert parse_retry_after(value) is None


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("30", 30.0), (" 5 ", 5.0), ("1.5", 1.5)])
def test_retry_after_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


def test_negative_retry_after_is_clamped_to_zero() -> None:
    assert parse_retry_after("-10") == 0.0


def test_retry_after_http_date_in_the_future(frozen_clock: float) -> None:
    assert parse_retry_after(http_date(45)) == pytest.approx(45.0)


def test_retry_after_http_date_in_the_past_is_zero(frozen_clock: float) -> None:
    assert parse_retry_after(http_date(-600)) == 0.0


# --- transport errors ---------------------------------------------------------------------------


def test_connect_error_is_unavailable() -> None:
    error = from_transport(httpx.ConnectError("connection refused"), upstream_timed_out_by_caller=False)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_UNAVAILABLE"
    assert "ConnectError" in error.message


def test_remote_protocol_error_is_unavailable() -> None:
    error = from_transport(httpx.RemoteProtocolError("peer closed"), upstream_timed_out_by_caller=False)
    assert error.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("by_caller", [False, True])
def test_read_timeout_is_deadline_exceeded(by_caller: bool) -> None:
    error = from_transport(httpx.ReadTimeout("slow"), upstream_timed_out_by_caller=by_caller)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason == "UPSTREAM_TIMEOUT"
    assert ("deadline" in error.message) is by_caller
    assert ("upstream timeout" in error.message) is not by_caller


def test_connect_timeout_is_deadline_exceeded() -> None:
    error = from_transport(httpx.ConnectTimeout("slow"), upstream_timed_out_by_caller=False)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_pool_timeout_is_unavailable_not_deadline_exceeded() -> None:
    error = from_transport(httpx.PoolTimeout("pool full"), upstream_timed_out_by_caller=True)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_POOL_EXHAUSTED"


def test_a_rejected_tls_certificate_is_unavailable_and_says_why() -> None:
    # As httpx raises it: its ConnectError from httpcore's, from the ssl module's error.
    rejected = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    rejected.verify_message = "unable to get local issuer certificate"
    inner = httpcore.ConnectError("TLS handshake failed")
    inner.__cause__ = rejected
    outer = httpx.ConnectError("TLS handshake failed")
    outer.__cause__ = inner

    error = from_transport(outer, upstream_timed_out_by_caller=False)

    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_UNAVAILABLE"
    assert error.message == "upstream TLS certificate rejected: unable to get local issuer certificate"


def test_a_body_that_cannot_be_decoded_is_a_bad_response_saying_why() -> None:
    error = errors.undecodable("the gzip body is corrupt")
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_BAD_RESPONSE"
    assert error.message.endswith("the gzip body is corrupt")


# --- other helpers ------------------------------------------------------------------------------


def test_not_json_is_unavailable_and_names_the_content_type() -> None:
    error = errors.not_json(200, "text/html", [])
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_BAD_RESPONSE"
    assert "text/html" in error.message
    assert "none" in errors.not_json(200, None, []).message


def test_malformed_is_internal_and_keeps_the_request_id() -> None:
    error = errors.malformed("expected 3 results, got 2", "req-5")
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.reason == "UPSTREAM_BAD_RESPONSE"
    assert "expected 3 results, got 2" in error.message
    assert error.metadata == {"upstream_request_id": "req-5"}
    assert error.upstream_request_id == "req-5"
    assert errors.malformed("x", None).metadata == {}


def test_too_large_is_unavailable_and_names_the_limit() -> None:
    error = errors.too_large(1024)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "1024" in error.message


@pytest.mark.parametrize("value", ["inf", "1e400", "1e20", "86400000"])
def test_a_huge_retry_after_is_capped(value: str) -> None:
    assert parse_retry_after(value) == errors.MAX_RETRY_AFTER


def test_a_nan_retry_after_is_ignored() -> None:
    assert parse_retry_after("nan") is None


def test_a_capped_retry_after_still_becomes_a_status_with_retry_info() -> None:
    from google.rpc import error_details_pb2, status_pb2

    from rerank_service.api.grpc.status import error_metadata

    error = errors.from_http_status(429, UpstreamErrorBody(), "inf", pass_through=False, secrets=[])
    status = status_pb2.Status.FromString(dict(error_metadata(error, "rid"))["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status.details)
    assert retry.retry_delay.seconds == int(errors.MAX_RETRY_AFTER)


# --- which failures may another deployment answer ----------------------------------------------

# Every reason an upstream or local deployment fails with, and whether it says the deployment
# cannot answer now (the router then tries another) or that the request itself is wrong.
_DEPLOYMENT_REASONS = frozenset(
    {
        "UPSTREAM_UNAVAILABLE",  # unreachable, reset, 5xx
        "UPSTREAM_CIRCUIT_OPEN",  # down
        "UPSTREAM_POOL_EXHAUSTED",  # our connections to it are all busy
        "UPSTREAM_RATE_LIMITED",  # 429
        "UPSTREAM_TIMEOUT",  # it took too long (the caller's deadline is checked apart)
        "UPSTREAM_BAD_RESPONSE",  # garbage
        "UPSTREAM_UNEXPECTED_STATUS",  # a 1xx/3xx: not a rerank API now
        "BACKEND_NOT_READY",  # a local model still loading, or closed by a reload
        "MODEL_FAILED",  # a local model raised (test_batcher.py)
    }
)


def _refused_by_a_down_deployment() -> ServiceError:
    health = DeploymentHealth(min_failures=1, cooldown=60.0)
    health.record(Outcome.FAILURE, unreachable=True)
    with pytest.raises(ServiceError) as refused:
        health.admit()
    return refused.value


def _every_failure() -> list[tuple[ServiceError, bool]]:
    """Each failure, and whether the caller's own token went upstream (pass-through)."""
    statuses = [
        (map_status(status, pass_through=through), through)
        for status in range(100, 600)
        for through in (False, True)
    ]
    transport = [
        from_transport(failure, upstream_timed_out_by_caller=by_caller)
        for failure in (
            httpx.ConnectError("refused"),
            httpx.ReadError("reset"),
            httpx.RemoteProtocolError("closed"),
            httpx.ConnectTimeout("slow"),
            httpx.ReadTimeout("slow"),
            httpx.PoolTimeout("full"),
        )
        for by_caller in (False, True)
    ]
    helpers = [
        errors.timed_out(by_caller_deadline=False),
        errors.not_json(200, None, []),
        errors.malformed("x", None),
        errors.undecodable("x"),
        errors.too_large(1),
    ]
    others = [*transport, *helpers, _refused_by_a_down_deployment(), not_ready("loading")]
    return [*statuses, *((error, False) for error in others)]


def _deployments_fault(error: ServiceError, pass_through: bool) -> bool:
    if error.reason == "UPSTREAM_AUTH_FAILED":
        # The deployment's own key refused (INTERNAL: no caller can fix it); in pass-through
        # mode the caller's token was, which every deployment would refuse.
        return error.code == grpc.StatusCode.INTERNAL
    if error.reason == "UPSTREAM_NOT_FOUND":
        # A 404 to the model id and URL of the deployment's config, unless the caller's
        # token went upstream (its own account, maybe).
        return not pass_through
    return error.reason in _DEPLOYMENT_REASONS


def test_a_failure_is_the_deployments_exactly_when_its_reason_says_it_cannot_answer_now() -> None:
    failures = _every_failure()
    for error, pass_through in failures:
        expected = FailureKind.DEPLOYMENT if _deployments_fault(error, pass_through) else FailureKind.REQUEST
        assert error.kind is expected, (error.reason, error.metadata, pass_through)
    assert {error.reason for error, _ in failures} >= _DEPLOYMENT_REASONS - {"MODEL_FAILED"}


def test_an_http_date_with_minus_zero_zone_is_read_as_gmt(frozen_clock: float) -> None:
    assert parse_retry_after("Sun, 01 Jun 2025 12:00:30 -0000") == pytest.approx(30.0)
