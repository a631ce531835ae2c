"""Each caller's limits, checked once a call's request is read and before any work: its
requests, documents and input tokens per minute (token buckets, buckets.py) and its calls
in flight.

Tokens are estimated before the call as the upstream bills them (the query once per
document, plus each document: one token per 3 bytes of UTF-8, as the chunker counts) and
corrected when the call ends by what the answer says it used. The buckets live in Redis
with `--limits-store` (limits_store.py), else in this process. With a store every call is
taken from this process's own buckets and calls in flight too, first (no round trip): a
call they refuse (this process alone holds the caller's `concurrent` calls, or used its
bucket) is refused at once. While Redis does not answer, `--limits-store-failure open`
(the default) checks this process's own buckets instead, which hold what its calls took
through Redis too, and `closed` refuses the calls of callers with limits.

A refusal is RESOURCE_EXHAUSTED with a google.rpc QuotaFailure (which limit, which caller)
and RetryInfo (when a retry can succeed); it costs no upstream call and no model time.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import grpc

from rerank_service.config import SettingError, ca_bundle
from rerank_service.config.callers import CallerLimits
from rerank_service.config.server import LimitsStoreConfig
from rerank_service.core.chunking import estimate_tokens, text_bytes
from rerank_service.core.domain import QuotaViolation, RerankRequest, ServiceError
from rerank_service.observability.caller_metrics import CallerMetrics
from rerank_service.pipeline.buckets import CONCURRENT, LocalBuckets, Refusal, costs_of
from rerank_service.pipeline.callers import Caller
from rerank_service.pipeline.limits_store import RedisLimits, StoreUnavailable
from rerank_service.redis_client import redis_client

# The ErrorInfo reason of every refusal for a caller's limit (its `limit` in the metadata).
CALLER_LIMITED = "CALLER_LIMITED"
FAIR_SHARE = "fair_share"
# A lease among a caller's calls in flight (Redis) outlives a call without a deadline by
# at most this: a worker that dies holding one frees it then.
MAX_LEASE_SECONDS = 600.0
STORE_RETRY_AFTER = 1.0  # what callers refused while the store is down are told to wait


def estimated_tokens(request: RerankRequest) -> int:
    """The input tokens the upstream will bill for `request`, estimated: the query once per
    document, plus every document (their UTF-8 bytes / 3 together: the call's answer
    corrects the estimate, so it is counted fast rather than document by document)."""
    documents = request.documents
    size = sum(map(len, documents)) if all(map(str.isascii, documents)) else sum(map(text_bytes, documents))
    return len(documents) * estimate_tokens(request.query) + -(-size // 3)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a call admitted under its caller's limits took, to settle when it ends."""

    caller: str
    limits: CallerLimits
    tokens_taken: int
    lease: str | None  # its lease in Redis, or None: taken from this process's buckets


class Limiter:
    """Checks and settles callers' limits against Redis, or this process's buckets."""

    def __init__(self, store: RedisLimits | None = None, *, fail_open: bool = True) -> None:
        self.store = store
        self.local = LocalBuckets()
        self._fail_open = fail_open

    async def admit(
        self,
        caller: Caller,
        request: RerankRequest,
        lease: str,
        deadline: float | None,
        *,
        documents: int | None = None,
    ) -> Grant | None:
        """Take the call's costs from its caller's limits (None: the caller has none), or
        raise RESOURCE_EXHAUSTED (UNAVAILABLE when the store is down and fails closed).
        `request` is what the backends will score (a long document's parts, truncated or
        chunked), which its tokens are estimated from; `documents`, what the caller sent
        (default: `request`'s), which its documents bucket counts."""
        limits = caller.limits
        if limits is None:
            return None
        store = self.store
        if store is None:
            return self.admit_here(caller, request, documents=documents)
        tokens = estimated_tokens(request) if limits.tokens is not None else 0
        costs = costs_of(limits, len(request.documents) if documents is None else documents, tokens)
        # Taken from this process's buckets and calls in flight first, whatever Redis says:
        # what this process's own calls (admitted, or being checked) hold is part of what all
        # hold together, so a call it refuses is refused at once, with no round trip and no
        # concurrent re-check holding the call's admission slot (a flood by a caller at its
        # concurrent limit would fill them all); and if Redis stops answering, the fallback
        # starts from what this process really holds and used, not from full buckets.
        local = self.local
        refusal = local.take(caller.name, limits, costs)
        if refusal is not None:
            raise limited(caller.name, limits, refusal)
        remaining = MAX_LEASE_SECONDS if deadline is None else deadline - time.monotonic()
        try:
            refusal = await store.take(
                caller.name,
                limits,
                costs,
                lease,
                min(MAX_LEASE_SECONDS, max(remaining, 1.0)),
                deadline=deadline,
            )
        except StoreUnavailable:
            if self._fail_open:  # taken from this process's buckets above: that is the fallback
                return Grant(caller.name, limits, tokens, None)
            local.put_back(caller.name, limits, costs)
            raise store_unavailable(caller.name) from None
        except BaseException:  # cancelled while checked: the store gives back what it took
            local.put_back(caller.name, limits, costs)
            raise
        if refusal is not None:
            local.put_back(caller.name, limits, costs)
            raise limited(caller.name, limits, refusal)
        return Grant(caller.name, limits, tokens, lease)

    def admit_here(self, caller: Caller, request: RerankRequest, *, documents: int | None = None) -> Grant:
        """`admit` against this process's buckets: no store, nothing to wait for."""
        limits = caller.limits
        assert limits is not None
        tokens = estimated_tokens(request) if limits.tokens is not None else 0
        counted = len(request.documents) if documents is None else documents
        refusal = self.local.take(caller.name, limits, costs_of(limits, counted, tokens))
        if refusal is not None:
            raise limited(caller.name, limits, refusal)
        return Grant(caller.name, limits, tokens, None)

    def settle(self, grant: Grant, tokens_used: int, limits_now: CallerLimits | None = None) -> None:
        """The call ended having used `tokens_used` input tokens: correct its tokens bucket
        and give back its call in flight, in this process at once and, if Redis took it, in
        Redis (with the caller's next check, else at once).
        `limits_now`: the caller's limits now, if a reload changed them since the grant: its
        bucket is corrected at the rate and burst it has now (the grant's refilled it at an
        old rate, or capped it at an old burst); its call in flight goes back as it was taken."""
        limits = grant.limits
        if limits_now is not None and limits_now.tokens != limits.tokens:
            limits = dataclasses.replace(limits, tokens=limits_now.tokens)
        correction = tokens_used - grant.tokens_taken if limits.tokens is not None else 0
        self.local.give_back(grant.caller, limits, correction)  # taken here whatever the lease
        if grant.lease is not None and self.store is not None:
            self.store.settle(grant.caller, limits, correction, grant.lease)

    async def close(self) -> None:
        """Send the settlements still pending, then close the store's connections."""
        if self.store is not None:
            await self.store.aclose()


def build_limiter(config: LimitsStoreConfig, metrics: CallerMetrics) -> Limiter:
    """The limiter of `--limits-store` (Redis; the client connects on first use), or of this
    process's buckets alone."""
    if config.url is None:
        return Limiter(fail_open=config.fail_open)
    ca_file = None if config.ca_file is None else ca_bundle(config.ca_file, "limits_store_ca_file")
    try:
        client = redis_client(config.url, timeout=config.timeout, ca_file=ca_file)
    except ValueError as exc:  # a URL redis-py cannot read (settings.py refuses those first)
        raise SettingError("limits_store", str(exc)) from None
    store = RedisLimits(
        client,
        timeout=config.timeout,
        key_prefix=config.key_prefix,
        on_error=metrics.store_error,
        on_round_trip=metrics.store_round_trip,
    )
    return Limiter(store, fail_open=config.fail_open)


def limited(caller: str, limits: CallerLimits, refusal: Refusal) -> ServiceError:
    """RESOURCE_EXHAUSTED for a call over its caller's limit, saying which and when to retry."""
    what = _described(limits, refusal.limit)
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"caller {caller!r} is over its {refusal.limit} limit ({what}); retry in {refusal.retry_after:.2f} s",
        reason=CALLER_LIMITED,
        retry_after=refusal.retry_after,
        metadata={"caller": caller, "limit": refusal.limit},
        quota_violations=(QuotaViolation(f"caller:{caller}", f"{refusal.limit}: {what}"),),
    )


def fair_share_refusal(caller: str, held: int, slots: int, share: float) -> ServiceError:
    """RESOURCE_EXHAUSTED for a caller holding its share of the admission slots while others call."""
    what = f"{held} of {slots} call slots held, at most {share:g} of them while other callers call"
    return share_refusal(caller, " of the call slots", what)


def share_refusal(caller: str, of: str, what: str) -> ServiceError:
    """RESOURCE_EXHAUSTED for a caller at its share (--caller-max-share) `of` a bound, `what`
    saying how much it holds: refused as a limit of its own (CALLER_LIMITED, fair_share)."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"caller {caller!r} holds its share{of} ({what}; --caller-max-share); retry shortly",
        reason=CALLER_LIMITED,
        retry_after=0.05,
        metadata={"caller": caller, "limit": FAIR_SHARE},
        quota_violations=(QuotaViolation(f"caller:{caller}", f"{FAIR_SHARE}: {what}"),),
    )


def store_unavailable(caller: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"caller {caller!r} has limits and the limits store does not answer (--limits-store-failure "
        "closed); retry shortly",
        reason="LIMITS_STORE_UNAVAILABLE",
        retry_after=STORE_RETRY_AFTER,
        metadata={"caller": caller},
    )


def _described(limits: CallerLimits, limit: str) -> str:
    if limit == CONCURRENT:
        return f"{limits.concurrent} calls in flight"
    bucket = next(bucket for bucket in limits.buckets if bucket.name == limit)
    unit = limit.removesuffix("_per_minute")
    return f"{_number(bucket.per_minute)} {unit} a minute, bursts of {_number(bucket.burst)}"


def _number(value: float) -> str:
    """3000000 as 3,000,000; 0.5 as 0.5."""
    return f"{value:,.0f}" if value == int(value) else f"{value:,g}"
