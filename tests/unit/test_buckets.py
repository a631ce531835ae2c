"""Token buckets in the process: refill, burst, all-or-nothing, debts, calls in flight."""

from __future__ import annotations

import pytest

from rerank_service.config.callers import BucketLimit, CallerLimits
from rerank_service.pipeline.buckets import (
    CONCURRENT,
    CONCURRENT_RETRY_AFTER,
    LocalBuckets,
    Refusal,
    costs_of,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def per_minute(name: str, rate: float, burst: float | None = None) -> BucketLimit:
    return BucketLimit(name, rate, burst if burst is not None else rate)


RPM = "requests_per_minute"
DPM = "documents_per_minute"
TPM = "tokens_per_minute"


def test_a_bucket_lets_its_burst_through_then_refills_at_its_rate() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    limits = CallerLimits(requests=per_minute(RPM, 60))  # one a second, bursts of 60

    taken = [buckets.take("a", limits, [1]) for _ in range(60)]
    refused = buckets.take("a", limits, [1])
    clock.now += 1.0  # one more call's worth
    again = buckets.take("a", limits, [1])

    assert taken == [None] * 60
    assert refused == Refusal(RPM, 1.0)
    assert again is None


def test_no_fixed_window_lets_twice_the_limit_through_around_a_boundary() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    limits = CallerLimits(requests=per_minute(RPM, 60, burst=10))

    served = 0
    for _ in range(120):  # two minutes, a call every 0.1 s: 1,200 tried
        for _ in range(10):
            served += buckets.take("a", limits, [1]) is None
            clock.now += 0.1

    assert served <= 120 + 10  # the rate over the time, plus one burst


def test_a_call_takes_from_every_bucket_or_from_none() -> None:
    buckets = LocalBuckets(Clock())
    limits = CallerLimits(requests=per_minute(RPM, 100), documents=per_minute(DPM, 10))

    assert buckets.take("a", limits, [1, 8]) is None
    refused = buckets.take("a", limits, [1, 5])  # 2 documents left: refused, no request taken

    assert refused is not None
    assert refused.limit == DPM
    assert buckets.level("a", limits.requests) == pytest.approx(99)  # type: ignore[arg-type]


def test_the_refusal_names_the_limit_that_waits_longest() -> None:
    buckets = LocalBuckets(Clock())
    limits = CallerLimits(requests=per_minute(RPM, 1, burst=1), documents=per_minute(DPM, 60, burst=1))
    buckets.take("a", limits, [1, 1])

    refused = buckets.take("a", limits, [1, 1])

    assert refused == Refusal(RPM, 60.0)  # documents would be back in 1 s


def test_a_call_larger_than_the_bucket_waits_for_it_full_and_leaves_a_debt() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    limits = CallerLimits(tokens=per_minute(TPM, 600, burst=100))  # 10 a second

    assert buckets.take("a", limits, [250]) is None  # full: let in, 150 owed
    refused = buckets.take("a", limits, [10])

    assert refused == Refusal(TPM, 16.0)  # from -150 to 10: 160 tokens at 10/s
    clock.now += 16.0
    assert buckets.take("a", limits, [10]) is None


def test_a_token_correction_charges_what_was_used_beyond_the_estimate() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    limits = CallerLimits(tokens=per_minute(TPM, 60, burst=100))
    buckets.take("a", limits, [50])

    buckets.give_back("a", limits, token_correction=30)  # used 80
    assert buckets.level("a", limits.tokens) == pytest.approx(20)  # type: ignore[arg-type]
    buckets.give_back("a", limits, token_correction=-500)  # a refund never overfills
    assert buckets.level("a", limits.tokens) == pytest.approx(100)  # type: ignore[arg-type]


def test_calls_in_flight_are_counted_and_given_back() -> None:
    buckets = LocalBuckets(Clock())
    limits = CallerLimits(concurrent=2)

    first, second, third = (buckets.take("a", limits, []) for _ in range(3))
    buckets.give_back("a", limits, 0)
    fourth = buckets.take("a", limits, [])

    assert (first, second) == (None, None)
    assert third is not None
    assert third.limit == CONCURRENT
    assert fourth is None
    assert buckets.in_flight("a") == 2


def test_a_take_put_back_leaves_the_buckets_as_if_never_taken() -> None:
    """The limits store refused the call (or it was cancelled) after this process took it."""
    clock = Clock()
    buckets = LocalBuckets(clock)
    requests, tokens = per_minute(RPM, 6, burst=5), per_minute(TPM, 60, burst=100)
    limits = CallerLimits(requests=requests, tokens=tokens, concurrent=2)
    assert buckets.take("a", limits, [1, 60]) is None  # stays taken
    assert buckets.take("a", limits, [1, 30]) is None
    assert buckets.take("a", limits, [1, 5]) == Refusal(CONCURRENT, CONCURRENT_RETRY_AFTER)

    clock.now += 2.0  # refilled by 0.2 requests and 2 tokens meanwhile: kept
    buckets.put_back("a", limits, [1, 30])

    assert buckets.in_flight("a") == 1
    assert buckets.level("a", requests) == pytest.approx(5 - 1 + 0.2)
    assert buckets.level("a", tokens) == pytest.approx(100 - 60 + 2)
    buckets.put_back("a", limits, [1, 60])
    assert buckets.level("a", tokens) == pytest.approx(100)  # never past the burst


def test_callers_have_buckets_of_their_own() -> None:
    buckets = LocalBuckets(Clock())
    limits = CallerLimits(requests=per_minute(RPM, 1))

    assert buckets.take("a", limits, [1]) is None
    assert buckets.take("a", limits, [1]) is not None
    assert buckets.take("b", limits, [1]) is None


def test_a_smaller_burst_after_a_reload_holds_at_once() -> None:
    buckets = LocalBuckets(Clock())
    buckets.take("a", CallerLimits(requests=per_minute(RPM, 100)), [1])  # 99 left

    lowered = CallerLimits(requests=per_minute(RPM, 2))

    assert buckets.take("a", lowered, [1]) is None
    assert buckets.take("a", lowered, [1]) is None
    assert buckets.take("a", lowered, [1]) is not None


def test_costs_follow_the_buckets_order() -> None:
    limits = CallerLimits(
        requests=per_minute(RPM, 1), documents=per_minute(DPM, 1), tokens=per_minute(TPM, 1)
    )

    assert costs_of(limits, documents=7, tokens=900) == [1.0, 7.0, 900.0]
    assert costs_of(CallerLimits(tokens=per_minute(TPM, 1)), documents=7, tokens=900) == [900.0]
