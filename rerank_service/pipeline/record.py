"""A call's facts, gathered by the pipeline (call.py), the one access-log line they make,
and the names under which a call reports them to its caller (gRPC trailing metadata, HTTP
headers: the same names on both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from rerank_service.core.domain import NO_TIMINGS, CacheOutcome, RerankOutcome, ServiceError, Timings, echo
from rerank_service.observability.logging import get_logger
from rerank_service.observability.metrics import code_name

_log = get_logger("rerank_service.access")

REQUEST_ID_KEY = "x-request-id"
# Every upstream request id of a call split into chunks, comma-separated.
UPSTREAM_IDS_KEY = "x-upstream-request-ids"
# Where a call's time went, in milliseconds (decimal strings), as peers (TEI) report it.
TOTAL_TIME_KEY = "x-total-time"
QUEUE_TIME_KEY = "x-queue-time"
UPSTREAM_TIME_KEY = "x-upstream-time"  # the upstream backend
INFERENCE_TIME_KEY = "x-inference-time"  # the local backend
# Where usage.total_tokens came from: upstream (its own count), estimate (the service's),
# model (a local model's tokenizer), cache (nothing was scored: every pair was cached).
USAGE_SOURCE_KEY = "x-usage-source"
# The deployment(s) of the route that answered, or the last one that failed.
DEPLOYMENT_KEY = "x-deployment"
# What the score cache answered of the call: hit (every pair), partial, miss.
CACHE_KEY = "x-cache"
# The upstream ids a caller is shown (UPSTREAM_IDS_KEY) take at most this many characters:
# gRPC clients refuse more than 8 KiB of metadata by default, and a call split into
# hundreds of requests has hundreds of ids. The access log keeps every one.
MAX_REPORTED_IDS_CHARS = 2048


def reported_ids(ids: Sequence[str]) -> str:
    """`ids` comma-separated, as many as fit, then `,+N more` for the rest."""
    shown = 0
    size = 0
    for upstream_id in ids:
        size += len(upstream_id) + 1
        if size > MAX_REPORTED_IDS_CHARS:
            break
        shown += 1
    text = ",".join(ids[:shown])
    return text if shown == len(ids) else f"{text},+{len(ids) - shown} more"


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What one call's log line and metrics say, gathered at the edge."""

    method: str
    peer: str
    request_id: str
    documents: int | None = None
    model: str | None = None
    total_tokens: int | None = None
    upstream_request_ids: tuple[str, ...] = ()
    timings: Timings = NO_TIMINGS
    items: int | None = None  # responses sent on a stream
    item_id: str | None = None  # the RerankStream item this is about
    usage_source: str | None = None  # where total_tokens came from, when not the upstream
    instruct_ignored: bool = False  # the model does not take the instruct the caller sent
    deployments: tuple[str, ...] = ()  # that answered, or the last that failed
    caller: str | None = None  # who called (pipeline/callers.py), once known
    cache: CacheOutcome = CacheOutcome.OFF  # what the score cache answered
    cached_tokens: int = 0  # the tokens of the pairs it answered


def call_facts(
    method: str,
    peer: str,
    request_id: str,
    documents: int | None,
    model: str | None,
    outcome: RerankOutcome | None,
    failure: ServiceError | None,
    item_id: str | None = None,
    items: int | None = None,
    caller: str | None = None,
    attempted: str | None = None,
) -> CallFacts:
    """One call's facts, from what it asked and what came back up: an outcome or an error.
    `attempted`: the deployment it was last sent to, named when nothing that came back does
    (grpc ended it at its deadline there, its caller went away)."""
    if outcome is not None:
        return CallFacts(
            method, peer, request_id, documents, model, outcome.total_tokens,
            tuple(outcome.upstream_request_ids), outcome.timings, items, item_id,
            usage_source=None if outcome.usage_source == "upstream" else outcome.usage_source,
            instruct_ignored=outcome.instruct_ignored, deployments=tuple(outcome.deployments),
            cache=outcome.cache, cached_tokens=outcome.cached_tokens, caller=caller,
        )  # fmt: skip
    named = failed_on(failure, attempted)
    deployments = (named,) if named else ()
    if failure is not None:
        upstream_ids = (failure.upstream_request_id,) if failure.upstream_request_id else ()
        return CallFacts(
            method, peer, request_id, documents, model, None, upstream_ids, failure.timings, items, item_id,
            deployments=deployments, caller=caller,
        )  # fmt: skip
    return CallFacts(
        method, peer, request_id, documents, model, items=items, item_id=item_id, deployments=deployments,
        caller=caller,
    )  # fmt: skip


def failed_on(failure: ServiceError | None, attempted: str | None) -> str | None:
    """The deployment a call without an outcome is named after: the one that failed it,
    else the one it was last sent to (`attempted`: grpc ended it there, its caller left)."""
    return failure.deployment if failure is not None and failure.deployment else attempted


def log_call(
    facts: CallFacts, code: grpc.StatusCode, seconds: float, details: str | None, event: str = "call"
) -> None:
    extra: dict[str, Any] = {"details": details} if details else {}
    if facts.items is not None:
        extra["items"] = facts.items
    if facts.item_id is not None:
        extra["item_id"] = echo(facts.item_id)
    # Where the time went; the same numbers a unary answer carries as x-*-time metadata.
    timings = facts.timings
    if timings.queue_seconds:
        extra["queue_ms"] = round(timings.queue_seconds * 1000, 3)
    if timings.upstream_spans and (upstream := timings.upstream_seconds):
        extra["upstream_ms"] = round(upstream * 1000, 3)
    if timings.inference_seconds:
        extra["inference_ms"] = round(timings.inference_seconds * 1000, 3)
    if facts.upstream_request_ids:
        extra["upstream_request_ids"] = list(facts.upstream_request_ids)
    if facts.usage_source is not None:
        extra["usage_source"] = facts.usage_source
    if facts.instruct_ignored:
        extra["instruct_ignored"] = True
    if facts.deployments:
        extra["deployment"] = ",".join(facts.deployments)
    if facts.caller is not None:
        extra["caller"] = facts.caller
    if facts.cache is not CacheOutcome.OFF:
        extra["cache"] = facts.cache.value
        if facts.cached_tokens:
            extra["cached_tokens"] = facts.cached_tokens
    _log.info(
        event,
        method=facts.method,
        peer=facts.peer,
        code=code_name(code),
        latency_ms=round(seconds * 1000, 3),
        documents=facts.documents,
        total_tokens=facts.total_tokens,
        request_id=facts.request_id,
        # Caller-controlled strings are cut (core/domain.py's echo): an 8 MB model name
        # must not become an 8 MB log line.
        model=None if facts.model is None else echo(facts.model),
        **extra,
    )
