"""The per-attempt metric: every HTTP attempt counted by outcome and timed, however it ends."""

from __future__ import annotations

import time

from rerank_service.observability.metrics import Metrics


class AttemptMetric:
    """`with AttemptMetric(metrics) as attempt:` ... `attempt.outcome = <status or failure label>`."""

    __slots__ = ("_metrics", "_started", "outcome")

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __enter__(self) -> AttemptMetric:
        # Left as is when the attempt ends any other way: the call was cancelled under it.
        self.outcome: int | str = "cancelled"
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._metrics.observe_upstream(self.outcome, time.perf_counter() - self._started)
