"""The fair share (--caller-max-share) over what one caller's calls hold besides the slots
(pipeline/admission.py): the calls it has open and the bytes of its HTTP bodies still
arriving, held to its share always; and each item in flight of its RerankStreams, counted
as a slot it holds, so that a stream's --stream-concurrency items do not run past it.

Deterministic: a fake clock for the share's window, no sleep."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.edge import _Received, _StreamItems
from rerank_service.core.domain import ServiceError
from rerank_service.pipeline.admission import OPEN_CALLS, Admission
from rerank_service.pipeline.call import body_holder
from rerank_service.pipeline.callers import ANONYMOUS_CALLER, Caller
from rerank_service.pipeline.limits import FAIR_SHARE

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _admission(
    slots: int = 8, max_bytes: int | None = None, max_open: int | None = None
) -> tuple[Admission, list[str]]:
    refusals: list[str] = []
    admission = Admission(
        slots, max_bytes, max_open, caller_max_share=0.5, clock=Clock(), on_refusal=refusals.append
    )
    return admission, refusals


def _refusal(error: pytest.ExceptionInfo[ServiceError]) -> tuple[str | None, str | None]:
    return error.value.reason, error.value.metadata.get("limit")


def test_a_caller_alone_opens_at_most_its_share_of_the_open_calls_and_the_others_still_open() -> None:
    admission, refusals = _admission(max_open=8)
    for _ in range(4):
        admission.open_call("batch")  # silent streams, say: nobody else calls yet

    with pytest.raises(ServiceError) as refused:
        admission.open_call("batch")
    for _ in range(4):
        admission.open_call("search")  # the others still get in
    admission.close_call("batch")
    admission.open_call("batch")  # one closed: room for one again

    assert _refusal(refused) == ("CALLER_LIMITED", FAIR_SHARE)
    assert "--max-open-calls" in refused.value.message
    assert refusals == [FAIR_SHARE]
    assert admission.open == 8


def test_a_unary_call_leaves_its_callers_share_of_the_open_calls_once_it_holds_its_slot() -> None:
    """Its share holds the calls whose requests have not come (silent, or slow); one that
    holds its slot is the slots' share's (a caller alone may use every slot), open still."""
    admission, refusals = _admission(slots=8, max_open=6)  # a share of 3 open calls
    for _ in range(3):
        admission.open_call("batch")  # three unary calls, their requests still coming
    with pytest.raises(ServiceError):
        admission.open_call("batch")
    for _ in range(3):  # their requests are in: each takes its slot
        admission.enter(0, "batch")
        admission.release_open_share("batch")
    admission.open_call("batch")  # room in its share again
    for _ in range(3):
        admission.release(0, "batch")
        admission.close_call()

    assert refusals == [FAIR_SHARE]
    assert admission.open == 1
    assert admission.in_flight == 0


def test_calls_of_no_known_caller_are_held_to_max_open_calls_only() -> None:
    admission, refusals = _admission(max_open=4)
    for _ in range(4):
        admission.open_call()
    with pytest.raises(ServiceError) as refused:
        admission.open_call()
    for _ in range(4):
        admission.close_call()

    assert refused.value.reason == "OVERLOADED"
    assert refusals == [OPEN_CALLS]
    assert admission.open == 0


def test_the_bodies_arriving_of_one_caller_hold_at_most_its_share_of_the_bytes_always() -> None:
    admission, refusals = _admission(max_bytes=128 * MIB)
    for _ in range(4):  # 4 x 16 MiB declared, none sent: its share of 128 MiB
        admission.enter_body(16 * MIB, "batch", "batch")

    with pytest.raises(ServiceError) as refused:
        admission.enter_body(16 * MIB, "batch", "batch")
    fits = admission.body_fits(16 * MIB, "batch"), admission.body_fits(16 * MIB, "search")
    admission.enter_body(16 * MIB, "search", "search")  # the others still get in

    assert _refusal(refused) == ("CALLER_LIMITED", FAIR_SHARE)
    assert "--max-inflight-bytes" in refused.value.message
    assert fits == (False, True)
    assert refusals == [FAIR_SHARE]
    assert admission.bytes_in_flight == 80 * MIB


def test_a_body_that_arrived_stays_charged_but_no_longer_counts_as_arriving() -> None:
    admission, _ = _admission(max_bytes=128 * MIB)
    for _ in range(4):
        admission.enter_body(16 * MIB, "batch", "batch")

    admission.body_arrived(16 * MIB, "batch")  # in: its call works on it
    admission.enter_body(16 * MIB, "batch", "batch")

    assert admission.bytes_in_flight == 80 * MIB
    admission.give_bytes(16 * MIB)  # that call's end
    assert admission.bytes_in_flight == 64 * MIB


def test_one_body_alone_is_let_in_past_the_share() -> None:
    admission, refusals = _admission(max_bytes=10)  # a share of 5 bytes
    admission.enter_body(8, "batch", "batch")
    with pytest.raises(ServiceError):
        admission.enter_body(1, "batch", "batch")
    assert refusals == [FAIR_SHARE]


def test_bodies_are_counted_by_caller_where_one_is_known_else_by_client_address() -> None:
    holders = (
        body_holder(Caller("search"), "10.0.0.1"),
        body_holder(ANONYMOUS_CALLER, "10.0.0.1"),
        body_holder(ANONYMOUS_CALLER, "10.0.0.2"),
    )
    assert holders[0] == "search"
    assert len(set(holders)) == 3

    admission, _ = _admission(max_bytes=100)
    for _ in range(2):
        admission.enter_body(25, holders[1], "anonymous")
    with pytest.raises(ServiceError) as refused:
        admission.enter_body(25, holders[1], "anonymous")
    admission.enter_body(25, holders[2], "anonymous")
    assert "client address 10.0.0.1" in refused.value.message


def test_without_a_share_nothing_is_held_to_one() -> None:
    admission = Admission(8, 100, 4, caller_max_share=1.0)
    for _ in range(4):
        admission.open_call("batch")
        admission.enter_body(25, "batch", "batch")
    assert (admission.open, admission.bytes_in_flight) == (4, 100)


def test_each_stream_item_in_flight_counts_as_a_slot_of_its_caller_while_others_call() -> None:
    admission, refusals = _admission(slots=8)  # a share of 4
    admission.enter(0, "victim")  # another caller calls
    admission.enter(0, "flood")  # the stream's slot, with its first item
    for _ in range(3):
        admission.enter_item("flood")

    with pytest.raises(ServiceError) as refused:
        admission.enter_item("flood")
    held = admission.held("flood"), admission.in_flight
    admission.release_item("flood")  # one answered
    admission.enter_item("flood")

    assert _refusal(refused) == ("CALLER_LIMITED", FAIR_SHARE)
    assert held == (4, 2)
    assert refusals == [FAIR_SHARE]


async def _items(count: int) -> AsyncIterator[_Received]:
    for number in range(count):
        yield _Received(rerank_pb2.RerankStreamRequest(id=str(number)), 10)


async def test_a_stream_runs_its_callers_share_of_items_at_once_and_answers_the_rest_refused() -> None:
    admission, refusals = _admission(slots=8)  # a share of 4
    admission.enter(0, "victim")  # another caller holds a slot
    items = _StreamItems(_items(6), admission, idle_timeout=60.0)
    items.identify = lambda: Caller("flood")

    read = [await anext(items) for _ in range(6)]
    refused = [item.id for item in read if items.refusal(item) is not None]
    during = admission.held("flood"), admission.in_flight, admission.bytes_in_flight
    for item in read:
        items.answered(item)
    after = admission.held("flood"), admission.in_flight, admission.bytes_in_flight

    assert refused == ["4", "5"]
    assert refusals == [FAIR_SHARE, FAIR_SHARE]
    assert during == (4, 2, 40)  # one slot of the bound for the stream, 4 items of the share
    assert after == (0, 1, 0)


async def test_a_stream_closed_with_items_in_flight_gives_back_each_one() -> None:
    admission, _ = _admission(slots=8)
    items = _StreamItems(_items(3), admission, idle_timeout=60.0)
    items.identify = lambda: Caller("flood")
    read = [await anext(items) for _ in range(3)]
    items.answered(read[0])

    items.close()

    assert (admission.held("flood"), admission.in_flight, admission.bytes_in_flight) == (0, 0, 0)
