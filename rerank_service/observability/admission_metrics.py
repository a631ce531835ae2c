"""Admission's bounds and what is held against them, as gauges, and its refusals by bound.

In memory the gauges read the Admission's counts when /metrics is scraped
(Gauge.set_function): nothing is recorded per call. With `serve --workers N` the
supervisor serves only what the workers wrote to their files, which a function cannot
reach: each worker copies its counts in every PUBLISH_EVERY seconds (`publish`, from a
task the server runs), so there the gauges lag the calls by at most that. Refusals are
counted as they happen: they are few, and each must be seen.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from rerank_service.observability.logging import get_logger

_log = get_logger("rerank_service.metrics")

# Seconds between a worker's copies of its counts into the gauges (workers only).
PUBLISH_EVERY = 1.0


class AdmissionCounts(Protocol):
    """pipeline.admission.Admission, as read here."""

    @property
    def in_flight(self) -> int: ...
    @property
    def max_in_flight(self) -> int: ...
    @property
    def bytes_in_flight(self) -> int: ...
    @property
    def max_bytes(self) -> int | None: ...
    @property
    def open(self) -> int: ...
    @property
    def max_open(self) -> int | None: ...


def _bound(value: int | None) -> float:
    return math.inf if value is None else float(value)


# Each gauge: its name, its help, and how it reads an Admission.
_GAUGES: tuple[tuple[str, str, Callable[[AdmissionCounts], float]], ...] = (
    (
        "rerank_admission_slots_used",
        "Admission slots held now: one per unary call in flight, one per stream with an item in flight.",
        lambda admission: admission.in_flight,
    ),
    (
        "rerank_admission_slots_max",
        "Admission slots: --max-concurrent-requests (workers: summed).",
        lambda admission: admission.max_in_flight,
    ),
    (
        "rerank_admission_bytes_used",
        "Bytes of request messages being worked on now, counted against --max-inflight-bytes.",
        lambda admission: admission.bytes_in_flight,
    ),
    (
        "rerank_admission_bytes_max",
        "Request bytes admitted at once: --max-inflight-bytes (workers: summed).",
        lambda admission: _bound(admission.max_bytes),
    ),
    (
        "rerank_admission_open_calls",
        "RerankService gRPC calls open now, working or not (a stream that has sent nothing included).",
        lambda admission: admission.open,
    ),
    (
        "rerank_admission_open_calls_max",
        "Calls open at once: --max-open-calls (workers: summed).",
        lambda admission: _bound(admission.max_open),
    ),
)


class AdmissionMetrics:
    def __init__(self, registry: CollectorRegistry, multiprocess: bool) -> None:
        # Workers: each has bounds and counts of its own, so the replica's are their sum.
        self._gauges = [
            (Gauge(name, documentation, registry=registry, multiprocess_mode="livesum"), read)
            for name, documentation, read in _GAUGES
        ]
        self.refusals = Counter(
            "rerank_admission_refusals",
            "Calls refused with RESOURCE_EXHAUSTED by admission, by the bound that refused them: "
            "slots (--max-concurrent-requests), bytes (--max-inflight-bytes), open_calls "
            "(--max-open-calls), fair_share (--caller-max-share).",
            ["bound"],
            registry=registry,
        )
        self._refusals: dict[str, Counter] = {}  # by bound: see _refusal_count
        self._multiprocess = multiprocess
        self._watched: AdmissionCounts | None = None

    def watch(self, admission: AdmissionCounts, bounds: Iterable[str]) -> None:
        """Report `admission`'s bounds and counts from now on (the server's one Admission),
        and a refusal count for each of `bounds` from 0, so a rate reads from the start."""
        for bound in bounds:
            self._refusal_count(bound)
        self._watched = admission
        if self._multiprocess:
            self.publish()
            return
        for gauge, read in self._gauges:
            gauge.set_function(partial(read, admission))

    def publish(self) -> None:
        """Copy the counts into the gauges (workers: their files, which the supervisor sums)."""
        admission = self._watched
        if admission is None:
            return
        for gauge, read in self._gauges:
            gauge.set(read(admission))

    async def publish_while_running(self) -> None:
        """`publish` every PUBLISH_EVERY seconds until cancelled (a worker's task). A copy that
        fails (the files' disk full) is logged once and tried again: the gauges go stale, the
        calls go on."""
        failing = False
        while True:
            try:
                self.publish()
                failing = False
            except Exception as exc:
                if not failing:
                    _log.warning("admission metrics not published", error=f"{type(exc).__name__}: {exc}")
                failing = True
            await asyncio.sleep(PUBLISH_EVERY)

    def refused(self, bound: str) -> None:
        """Admission refused a call at `bound` (pipeline/admission.py names them)."""
        self._refusal_count(bound).inc()

    def _refusal_count(self, bound: str) -> Counter:
        """`bound`'s child of the refusals counter, bound once."""
        child = self._refusals.get(bound)
        if child is None:
            child = self._refusals[bound] = self.refusals.labels(bound)
        return child
