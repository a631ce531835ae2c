"""Admission: calls and bytes in flight, refused past their bounds; stream items wait for bytes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from rerank_service.core.domain import ServiceError
from rerank_service.pipeline.admission import Admission


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
