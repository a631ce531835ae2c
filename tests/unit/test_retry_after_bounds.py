"""What a refusal says about when to retry stays within a day, whatever produced the wait:
a cool-down or a caller's limit configured past any sense once made the refusal itself fail
(gRPC UNKNOWN "Value out of range" in place of UNAVAILABLE; a 301-digit HTTP Retry-After)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from rerank_service.api.grpc.servicer import to_error_proto
from rerank_service.api.grpc.status import MAX_RETRY_DELAY, error_metadata
from rerank_service.api.http.app import quota_fields
from rerank_service.api.http.statuses import MAX_RETRY_AFTER, retry_after_header
from rerank_service.config.callers import BucketLimit, CallerLimits, LimitsEntry
from rerank_service.core.domain import QuotaViolation, ServiceError
from rerank_service.pipeline.buckets import LocalBuckets

A_DAY_MS = 86_400_000


def refusal(retry_after: float) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "down",
        reason="UPSTREAM_CIRCUIT_OPEN",
        retry_after=retry_after,
        quota_violations=(QuotaViolation("caller:c", "requests_per_minute"),),
    )


def retry_info_ms(error: ServiceError) -> int:
    status = status_pb2.Status()
    raw = dict(error_metadata(error, "r"))["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    status.ParseFromString(raw)
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return int(info.retry_delay.ToMilliseconds())
    raise AssertionError("no RetryInfo")


@pytest.mark.parametrize("retry_after", [1e300, float("inf"), 86_400.5, 1e7])
def test_a_wait_past_a_day_is_said_as_a_day_on_grpc_and_http(retry_after: float) -> None:
    error = refusal(retry_after)

    assert MAX_RETRY_DELAY == MAX_RETRY_AFTER == 86_400
    assert retry_info_ms(error) == A_DAY_MS
    assert to_error_proto(error, "r").retry_delay.ToMilliseconds() == A_DAY_MS  # a stream item's
    assert retry_after_header(error) == "86400"
    assert quota_fields(error)["retry_after_seconds"] == 86_400


def test_a_wait_within_a_day_is_said_as_it_is() -> None:
    error = refusal(2.5)

    assert retry_info_ms(error) == 2500
    assert to_error_proto(error, "r").retry_delay.ToMilliseconds() == 2500
    assert retry_after_header(error) == "3"
    assert quota_fields(error)["retry_after_seconds"] == 2.5


@pytest.mark.parametrize("rate", [1e-310, 1e-323, 1e-7])
def test_a_limit_too_small_for_the_bucket_arithmetic_is_refused(rate: float) -> None:
    """1e-310 a minute made a caller's second call fail with OverflowError, 1e-323 with
    ZeroDivisionError, in place of RESOURCE_EXHAUSTED."""
    with pytest.raises(ValueError, match=r"must be at least 1e-06 \(one in a million minutes\)"):
        LimitsEntry(requests_per_minute=rate)


def test_the_smallest_limit_refuses_a_second_call_with_a_finite_wait() -> None:
    entry = LimitsEntry(requests_per_minute=1e-6)
    assert entry.requests_per_minute is not None
    bucket = BucketLimit("requests_per_minute", entry.requests_per_minute, entry.requests_per_minute)
    limits = CallerLimits(requests=bucket)
    buckets = LocalBuckets(lambda: 1000.0)

    assert buckets.take("c", limits, [1.0]) is None
    second = buckets.take("c", limits, [1.0])

    assert second is not None
    assert 0 < second.retry_after < 1e9  # about two years: finite, and said as a day
    assert retry_info_ms(refusal(second.retry_after)) == A_DAY_MS
