"""The fair share when a flood filled every slot while the others were quiet: a call of a
caller under its share waits (at most SLOT_WAIT, or its deadline) for the next slot released,
which is handed to it before anyone else may take it (pipeline/admission.py, SlotWait).

Deterministic: a fake clock for the share's window, and no sleep; the only timers are the
waits' own bounds, which a test that needs one to run out sets at a few milliseconds (what
then happens does not depend on when)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.edge import _Drain, _Received, _StreamItems
from rerank_service.core.domain import ServiceError
from rerank_service.pipeline.admission import DEADLINE_MARGIN, SLOTS, Admission, SlotWait
from rerank_service.pipeline.callers import Caller


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _flooded(slots: int = 4, max_bytes: int | None = None) -> tuple[Admission, list[str]]:
    """Every slot held by "flood", which called alone (no share held it back)."""
    refusals: list[str] = []
    admission = Admission(slots, max_bytes, caller_max_share=0.5, clock=Clock(), on_refusal=refusals.append)
    for _ in range(slots):
        admission.enter(0, "flood")
    return admission, refusals


def _slot_wait(admission: Admission, caller: str, size: int = 0) -> SlotWait:
    with pytest.raises(SlotWait) as waits:
        admission.enter(size, caller, may_wait=True)
    return waits.value


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition()` holds (the tasks' own steps, no timing)."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def test_a_caller_under_its_share_waits_for_the_next_slot_released_and_takes_it() -> None:
    admission, refusals = _flooded()
    waiting = asyncio.create_task(admission.wait_for_slot(_slot_wait(admission, "polite"), within=30))
    await _until(lambda: admission.waiting == 1)

    # Meanwhile the flood, past its share, takes nothing: every slot is still taken.
    with pytest.raises(ServiceError) as flood_refused:
        admission.enter(0, "flood", may_wait=True)
    admission.release(0, "flood")  # handed to the waiter, not freed
    assert admission.in_flight == 4
    with pytest.raises(ServiceError):
        admission.enter(0, "flood", may_wait=True)  # the slot is the waiter's already
    await waiting

    assert (admission.held("polite"), admission.held("flood"), admission.in_flight) == (1, 3, 4)
    assert admission.waiting == 0
    assert flood_refused.value.reason == "OVERLOADED"
    assert refusals == [SLOTS, SLOTS]  # the flood's two, not the waiter's
    admission.release(0, "flood")
    with pytest.raises(ServiceError) as share_refused:  # freed now: the flood is held to its share
        admission.enter(0, "flood")
    assert share_refused.value.metadata["limit"] == "fair_share"


async def test_a_wait_that_runs_out_is_refused_overloaded_and_counted_as_a_slots_refusal() -> None:
    admission, refusals = _flooded()

    with pytest.raises(ServiceError) as refused:
        await admission.wait_for_slot(_slot_wait(admission, "polite"), within=DEADLINE_MARGIN + 0.005)

    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == "OVERLOADED"
    assert "--max-concurrent-requests" in refused.value.message
    assert refusals == [SLOTS]
    assert admission.waiting == 0
    admission.release(0, "flood")  # nobody waits: the slot is free again
    assert admission.in_flight == 3


async def test_a_call_whose_deadline_has_passed_is_refused_without_waiting() -> None:
    admission, refusals = _flooded()

    with pytest.raises(ServiceError):
        await admission.wait_for_slot(_slot_wait(admission, "polite"), within=0)

    assert refusals == [SLOTS]
    assert admission.waiting == 0


async def test_a_waiter_cancelled_after_a_slot_was_handed_to_it_hands_it_on() -> None:
    admission, refusals = _flooded()
    first = asyncio.create_task(admission.wait_for_slot(_slot_wait(admission, "polite"), within=30))
    await _until(lambda: admission.waiting == 1)
    second = asyncio.create_task(admission.wait_for_slot(_slot_wait(admission, "other"), within=30))
    await _until(lambda: admission.waiting == 2)

    admission.release(0, "flood")  # handed to the first ...
    first.cancel()  # ... whose client is gone before it ran again
    with pytest.raises(asyncio.CancelledError):
        await first
    await second

    assert (admission.held("polite"), admission.held("other"), admission.held("flood")) == (0, 1, 3)
    assert admission.in_flight == 4
    assert refusals == []


async def test_a_waiter_cancelled_while_it_waits_leaves_the_queue_holding_nothing() -> None:
    admission, refusals = _flooded()
    waiting = asyncio.create_task(admission.wait_for_slot(_slot_wait(admission, "polite"), within=30))
    await _until(lambda: admission.waiting == 1)

    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    admission.release(0, "flood")

    assert admission.waiting == 0
    assert (admission.in_flight, admission.held("polite")) == (3, 0)
    assert refusals == []


async def test_the_waiters_are_bounded_by_the_slots() -> None:
    admission, refusals = _flooded(slots=2)  # a share of 1; the flood holds 2
    waits = [_slot_wait(admission, f"polite-{number}") for number in range(2)]
    tasks = [asyncio.create_task(admission.wait_for_slot(wait, within=30)) for wait in waits]
    await _until(lambda: admission.waiting == 2)

    with pytest.raises(ServiceError) as refused:  # a third waits not: refused at once
        admission.enter(0, "polite-2", may_wait=True)
    for _ in range(2):
        admission.release(0, "flood")
    await asyncio.gather(*tasks)

    assert refused.value.reason == "OVERLOADED"
    assert refusals == [SLOTS]
    assert (admission.held("polite-0"), admission.held("polite-1"), admission.held("flood")) == (1, 1, 0)


def test_a_call_waits_only_while_another_caller_holds_more_than_its_share() -> None:
    refusals: list[str] = []
    admission = Admission(4, caller_max_share=0.5, clock=Clock(), on_refusal=refusals.append)
    for caller in ("a", "a", "b", "b"):  # each at its share, none past it
        admission.enter(0, caller)

    with pytest.raises(ServiceError):
        admission.enter(0, "polite", may_wait=True)  # nobody to take a slot back from
    with pytest.raises(ServiceError):
        admission.enter(0, "a", may_wait=True)  # at its share itself
    with pytest.raises(ServiceError):
        admission.enter(0, None, may_wait=True)  # no caller known

    assert refusals == [SLOTS, SLOTS, SLOTS]


def test_a_caller_with_a_concurrent_limit_of_its_own_or_a_front_door_that_cannot_wait_is_refused() -> None:
    admission, refusals = _flooded()

    with pytest.raises(ServiceError):
        admission.enter(0, "indexer", capped=False, may_wait=True)  # not held to the share
    with pytest.raises(ServiceError):
        admission.enter(0, "polite")  # may_wait not given: refused as ever

    assert refusals == [SLOTS, SLOTS]


async def test_a_waiter_takes_its_bytes_with_the_slot_and_gives_the_slot_on_when_they_do_not_fit() -> None:
    admission, refusals = _flooded(max_bytes=100)
    admission.enter_bytes(90)  # bytes held by something else (an HTTP body arriving)
    first = asyncio.create_task(admission.wait_for_slot(_slot_wait(admission, "polite", 50), within=30))
    await _until(lambda: admission.waiting == 1)
    second = asyncio.create_task(admission.wait_for_slot(_slot_wait(admission, "other", 5), within=30))
    await _until(lambda: admission.waiting == 2)

    admission.release(0, "flood")
    with pytest.raises(ServiceError) as refused:
        await first  # 90 + 50 would pass 100: refused, its slot handed on
    await second

    assert "--max-inflight-bytes" in refused.value.message
    assert refusals == ["bytes"]
    assert (admission.held("polite"), admission.held("other"), admission.bytes_in_flight) == (0, 1, 95)
    assert admission.in_flight == 4


async def test_a_caller_waits_only_while_what_it_holds_and_has_waiting_is_under_its_share() -> None:
    admission, refusals = _flooded()  # 4 slots, a share of 2
    tasks = [
        asyncio.create_task(admission.wait_for_slot(_slot_wait(admission, "polite"), within=30))
        for _ in range(2)
    ]
    await _until(lambda: admission.waiting == 2)

    with pytest.raises(ServiceError) as refused:  # two waiting already: handed slots, its share
        admission.enter(0, "polite", may_wait=True)
    for _ in range(4):  # the flood ends
        admission.release(0, "flood")
    await asyncio.gather(*tasks)

    assert refused.value.reason == "OVERLOADED"
    assert refusals == [SLOTS]
    assert (admission.held("polite"), admission.in_flight) == (2, 2)
    admission.enter(0, "flood")  # the rest free again, for the others


def _polite_stream_under_a_flood() -> tuple[Admission, list[str]]:
    """4 slots, a share of 2: "flood" holds 3 (taken alone), "polite" the last one."""
    refusals: list[str] = []
    admission = Admission(4, caller_max_share=0.5, clock=Clock(), on_refusal=refusals.append)
    for _ in range(3):
        admission.enter(0, "flood")
    admission.enter(0, "polite")
    return admission, refusals


async def test_a_slot_is_not_handed_to_a_waiter_whose_caller_reached_its_share_meanwhile() -> None:
    admission, refusals = _polite_stream_under_a_flood()
    waiting = asyncio.create_task(admission.wait_for_slot(_slot_wait(admission, "polite"), within=30))
    await _until(lambda: admission.waiting == 1)
    admission.enter_item("polite")  # its stream's next item: it holds its share now

    admission.release(0, "flood")
    passed_over = admission.waiting, admission.in_flight, admission.held("polite")
    admission.release_item("polite")  # that item answered: under its share again
    await waiting

    assert passed_over == (1, 3, 2)  # the slot stayed free, the waiter waits on
    assert (admission.waiting, admission.in_flight, admission.held("polite")) == (0, 4, 2)
    assert refusals == []


async def test_a_waiter_passed_over_that_runs_out_of_time_is_refused_holding_nothing() -> None:
    admission, refusals = _polite_stream_under_a_flood()
    waiting = asyncio.create_task(
        admission.wait_for_slot(_slot_wait(admission, "polite"), within=DEADLINE_MARGIN + 0.005)
    )
    await _until(lambda: admission.waiting == 1)
    admission.enter_item("polite")  # its share held: passed over ...
    admission.release(0, "flood")
    admission.enter(0, "other")  # ... so the slot goes to whoever comes

    with pytest.raises(ServiceError) as refused:
        await waiting

    assert refused.value.reason == "OVERLOADED"
    assert refusals == [SLOTS]
    assert (admission.waiting, admission.in_flight, admission.held("polite")) == (0, 4, 2)


async def test_a_wait_ends_its_margin_before_the_calls_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    admission, _ = _flooded()
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_later = loop.call_later

    def recorded(delay: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
        timers.append(delay)
        return call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", recorded)
    waiting = asyncio.create_task(admission.wait_for_slot(_slot_wait(admission, "polite"), within=0.5))
    await _until(lambda: admission.waiting == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    assert timers == [pytest.approx(0.5 - DEADLINE_MARGIN)]  # its refusal reaches the client in time


async def test_a_call_with_no_more_than_the_margin_left_is_refused_at_once() -> None:
    admission, refusals = _flooded()
    waiting = admission.wait_for_slot(_slot_wait(admission, "polite"), within=DEADLINE_MARGIN)

    try:
        with pytest.raises(ServiceError) as refused:
            waiting.send(None)  # refused before it ever waits
    finally:
        waiting.close()

    assert refused.value.reason == "OVERLOADED"
    assert refusals == [SLOTS]
    assert admission.waiting == 0


async def _one_item() -> AsyncIterator[_Received]:
    yield _Received(rerank_pb2.RerankStreamRequest(id="0"), 10)


async def test_a_stream_item_handed_a_slot_after_the_drain_began_is_answered_unavailable() -> None:
    admission, _ = _flooded()
    drain = _Drain()
    items = _StreamItems(_one_item(), admission, idle_timeout=60.0, drain=drain)
    items.identify = lambda: Caller("polite")
    reading = asyncio.create_task(anext(items))
    await _until(lambda: admission.waiting == 1)

    drain.begin()  # SIGTERM while the item waits for a slot
    admission.release(0, "flood")  # handed to it
    item = await reading
    refusal = items.refusal(item)

    assert refusal is not None
    assert refusal.code == grpc.StatusCode.UNAVAILABLE  # as any item read since the drain began
    assert (admission.in_flight, admission.held("polite"), admission.held("flood")) == (3, 0, 3)
    items.answered(item)
    items.close()
    assert (admission.in_flight, admission.bytes_in_flight) == (3, 0)
