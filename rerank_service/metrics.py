"""Prometheus metrics: declared once here, recorded where things happen.

Every metric lives in the module-level REGISTRY (not prometheus-client's global one),
so tests and several servers in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

UPSTREAM_RETRIES = Counter(
    "rerank_upstream_retries",
    "Upstream attempts repeated after a retryable failure, by the failure's reason.",
    ["reason"],
    registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "rerank_upstream_circuit_state",
    "The upstream circuit breaker's state: 0 closed, 1 half-open, 2 open.",
    registry=REGISTRY,
)
_CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


def count_upstream_retry(reason: str) -> None:
    UPSTREAM_RETRIES.labels(reason=reason).inc()


def set_circuit_state(state: str) -> None:
    CIRCUIT_STATE.set(_CIRCUIT_STATES[state])
