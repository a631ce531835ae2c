"""Admission: calls and bytes in flight, refused past their bounds; stream items wait for bytes;
refusals counted by bound, and the counts read as gauges."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from prometheus_client import CollectorRegistry

from rerank_service.core.domain import ServiceError
from rerank_service.observability import admission_metrics
from rerank_service.observability.admission_metrics import AdmissionMetrics
from rerank_service.observability.metrics import Metrics
from rerank_service.pipeline.admission import BOUNDS, Admission
from tests.support.logs import LogCapture


def test_a_call_past_the_call_bound_is_refused_overloaded() -> None:
    admission = Admission(max_in_flight=1)
    admission.enter()

    with pytest.raises(ServiceError) as refused:
        admission.enter()

    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == "OVERLOADED"
    assert "--max-concurrent-requests" in refused.value.message


def test_bytes_past_the_budget_are_refused_and_given_back_on_release() -> None:
    admission = Admission(max_in_flight=10, max_bytes=100)
    admission.enter(60)

    with pytest.raises(ServiceError) as refused:
        admission.enter(50)
    admission.enter(40)  # exactly the budget
    admission.release(60)
    admission.enter(50)

    assert "--max-inflight-bytes" in refused.value.message
    assert (admission.in_flight, admission.bytes_in_flight) == (2, 90)


def test_a_request_larger_than_the_budget_alone_is_let_in() -> None:
    admission = Admission(max_in_flight=10, max_bytes=100)

    admission.enter(500)  # the message size bound limits it, not the budget

    with pytest.raises(ServiceError):
        admission.enter(1)


async def test_stream_items_wait_for_bytes_then_go_in_order_of_room() -> None:
    admission = Admission(max_in_flight=10, max_bytes=100)
    await admission.take_bytes(80)
    waiting = asyncio.create_task(admission.take_bytes(50))
    await asyncio.sleep(0.01)  # a moment in which a wrong grant would happen: nothing to wait for
    assert not waiting.done()

    admission.give_bytes(80)
    await asyncio.wait_for(waiting, 1)

    assert admission.bytes_in_flight == 50


# --- what admission reports: refusals by bound, and its counts as gauges -----------------------


def test_each_refusal_names_the_bound_that_refused_it() -> None:
    refusals: list[str] = []
    admission = Admission(4, max_bytes=100, max_open=3, caller_max_share=0.5, on_refusal=refusals.append)
    admission.enter(0, "other")  # another caller holds a slot
    admission.enter(60, "flood")
    admission.enter(0, "flood")  # 2 of 4: its share
    with pytest.raises(ServiceError):
        admission.enter(0, "flood")
    with pytest.raises(ServiceError):
        admission.enter(50)  # 110 bytes would pass 100
    admission.enter(0)  # the 4th slot
    with pytest.raises(ServiceError):
        admission.enter(0)
    for _ in range(3):
        admission.open_call()
    with pytest.raises(ServiceError):
        admission.open_call()
    admission.release(60, "flood")
    admission.enter(40)  # let in: nothing counted

    assert refusals == ["fair_share", "bytes", "slots", "open_calls"]


def test_the_gauges_read_the_bounds_and_what_is_held_when_scraped() -> None:
    metrics = Metrics()
    admission = Admission(8, max_bytes=1000, max_open=16, on_refusal=metrics.admission.refused)
    metrics.admission.watch(admission, BOUNDS)
    admission.open_call()
    admission.enter(300)
    with pytest.raises(ServiceError):
        admission.enter(800)

    sample = metrics.registry.get_sample_value
    assert sample("rerank_admission_slots_used") == 1
    assert sample("rerank_admission_slots_max") == 8
    assert sample("rerank_admission_bytes_used") == 300
    assert sample("rerank_admission_bytes_max") == 1000
    assert sample("rerank_admission_open_calls") == 1
    assert sample("rerank_admission_open_calls_max") == 16
    assert sample("rerank_admission_refusals_total", {"bound": "bytes"}) == 1
    # Every bound's count is there from the start, at 0.
    assert sample("rerank_admission_refusals_total", {"bound": "slots"}) == 0
    assert sample("rerank_admission_refusals_total", {"bound": "fair_share"}) == 0

    admission.release(300)
    admission.close_call()
    assert sample("rerank_admission_slots_used") == 0
    assert sample("rerank_admission_bytes_used") == 0
    assert sample("rerank_admission_open_calls") == 0


def test_an_unbounded_budget_reads_as_infinite() -> None:
    metrics = Metrics()
    metrics.admission.watch(Admission(8), BOUNDS)

    assert metrics.registry.get_sample_value("rerank_admission_bytes_max") == math.inf
    assert metrics.registry.get_sample_value("rerank_admission_open_calls_max") == math.inf


async def test_a_worker_whose_publish_fails_logs_it_once_and_publishes_again_once_it_can(
    monkeypatch: pytest.MonkeyPatch, logs: LogCapture
) -> None:
    monkeypatch.setattr(admission_metrics, "PUBLISH_EVERY", 0)
    registry = CollectorRegistry()
    metrics = AdmissionMetrics(registry, multiprocess=True)  # its gauges move when published
    admission = Admission(4)
    metrics.watch(admission, BOUNDS)
    admission.enter(10)
    publish, attempts, published = metrics.publish, [0], asyncio.Event()

    def failing_three_times() -> None:
        attempts[0] += 1
        if attempts[0] <= 3:
            raise OSError("No space left on device")
        publish()
        published.set()

    monkeypatch.setattr(metrics, "publish", failing_three_times)
    task = asyncio.create_task(metrics.publish_while_running())
    await asyncio.wait_for(published.wait(), 10)
    task.cancel()

    warnings = [e for e in logs.events() if e["event"] == "admission metrics not published"]
    assert len(warnings) == 1
    assert "No space left on device" in warnings[0]["error"]
    assert registry.get_sample_value("rerank_admission_slots_used") == 1
