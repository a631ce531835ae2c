"""What each caller (tenant) used and was refused, and the limits store's failures.

Recorded once per call by the call pipeline (pipeline/usage.py), from the same values the
call answered with, so the sums equal what the callers were told (`usage.total_tokens`):

- `rerank_caller_calls_total{caller,model,code}`: calls whose request was read;
- `rerank_caller_documents_total{caller,model}`: documents of answered calls;
- `rerank_caller_tokens_total{caller,model,source}`: `usage.total_tokens` of answered
  calls, by where the count came from (upstream, estimate, model);
- `rerank_caller_cached_tokens_total{caller,model}`: tokens of scores the score cache
  answered (`usage.cached_tokens`, not in total_tokens);
- `rerank_caller_backend_calls_total{caller,model}`: chunks sent to a backend;
- `rerank_caller_limited_total{caller,limit}`: calls refused for a limit;
- `rerank_limits_store_errors_total`: Redis round trips of the limits that failed;
- `rerank_limits_store_round_trips_total`: round trips to it (several calls' checks each
  under load).

Callers of the `callers:` section are a bounded set; callers named after a key they
bring (pass-through) are not, so past `MAX_KEY_CALLERS` of those the rest share the
label `other`.
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter

MAX_KEY_CALLERS = 256
OTHER = "other"


class CallerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "rerank_caller_calls",
            "Rerank calls (and stream items) of each caller whose request was read, by model and gRPC "
            "status code.",
            ["caller", "model", "code"],
            registry=registry,
        )
        self.documents = Counter(
            "rerank_caller_documents",
            "Documents of each caller's answered calls, by model.",
            ["caller", "model"],
            registry=registry,
        )
        self.tokens = Counter(
            "rerank_caller_tokens",
            "Input tokens of each caller's answered calls (the usage.total_tokens they were told), by "
            "model and source: upstream (its own count), estimate (the service's), model (a local "
            "model's tokenizer).",
            ["caller", "model", "source"],
            registry=registry,
        )
        self.cached_tokens = Counter(
            "rerank_caller_cached_tokens",
            "Tokens of the scores the score cache answered for each caller (usage.cached_tokens), by model.",
            ["caller", "model"],
            registry=registry,
        )
        self.backend_calls = Counter(
            "rerank_caller_backend_calls",
            "Chunks of each caller's answered calls sent to a backend (an upstream request or a "
            "local model's call), by model.",
            ["caller", "model"],
            registry=registry,
        )
        self.limited = Counter(
            "rerank_caller_limited",
            "Calls refused for a caller's limit: requests_per_minute, documents_per_minute, "
            "tokens_per_minute, concurrent, or fair_share (--caller-max-share).",
            ["caller", "limit"],
            registry=registry,
        )
        self.store_errors = Counter(
            "rerank_limits_store_errors",
            "Redis round trips of the callers' limits that failed or timed out (the call then went on "
            "per --limits-store-failure).",
            registry=registry,
        )
        self.store_round_trips = Counter(
            "rerank_limits_store_round_trips",
            "Round trips to the limits store's Redis: each carries the checks of every call that "
            "asked in the same turn of the event loop (one pipeline).",
            registry=registry,
        )
        self._children: dict[tuple[int, tuple[str, ...]], Counter] = {}  # by family's id, labels
        self._key_callers: set[str] = set()
        # An answered call's four children, bound once per caller, model and source.
        self._answered: dict[tuple[str, str, str], tuple[Counter, Counter, Counter, Counter]] = {}

    def label(self, caller: str, per_token: bool, accepted: bool = True) -> str:
        """The caller's label: its name, or `other` past MAX_KEY_CALLERS named after tokens
        passed through (`per_token`: any token names one). Such a caller takes a label of its
        own only with a call that was answered (`accepted`: the upstream took its token), so
        tokens nobody accepts, sent by the hundred, never take the labels of the keys in use.
        Other callers (the callers: section, --api-keys, anonymous) are the configuration's,
        a bounded set: each is always its own label."""
        if not per_token or caller in self._key_callers:
            return caller
        if not accepted or len(self._key_callers) >= MAX_KEY_CALLERS:
            return OTHER
        self._key_callers.add(caller)
        return caller

    def call(self, caller: str, model: str, code: grpc.StatusCode) -> None:
        self._child(self.calls, caller, model, code.name).inc()

    def answered(
        self,
        caller: str,
        model: str,
        documents: int,
        tokens: int,
        source: str,
        cached_tokens: int,
        backend_calls: int,
    ) -> None:
        children = self._answered.get((caller, model, source))
        if children is None:
            children = self._answered[caller, model, source] = (
                self.documents.labels(caller, model),
                self.tokens.labels(caller, model, source),
                self.cached_tokens.labels(caller, model),
                self.backend_calls.labels(caller, model),
            )
        documents_child, tokens_child, cached_child, backend_child = children
        documents_child.inc(documents)
        tokens_child.inc(tokens)
        if cached_tokens:
            cached_child.inc(cached_tokens)
        if backend_calls:
            backend_child.inc(backend_calls)

    def refused(self, caller: str, limit: str) -> None:
        self._child(self.limited, caller, limit).inc()

    def store_error(self) -> None:
        self.store_errors.inc()

    def store_round_trip(self) -> None:
        self.store_round_trips.inc()

    def _child(self, family: Counter, *labels: str) -> Counter:
        key = (id(family), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*labels)
        return found
