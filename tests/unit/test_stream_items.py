"""A RerankStream's items at the edge (api/grpc/edge.py's _StreamItems), read by the
window (core/stream_window.py) as the servicer reads them: what an item holds, and when,
against the admission slots, the fair share and the byte budget; the drain; a reload.

Deterministic: a fake clock for the share's window, the loop's own steps, no sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.edge import _Drain, _Received, _StreamItems
from rerank_service.config.callers import CallerLimits
from rerank_service.core.domain import ServiceError
from rerank_service.core.stream_window import answer_concurrently
from rerank_service.pipeline.callers import Caller
from rerank_service.pipeline.limits import FAIR_SHARE
from tests.unit.test_admission_caller_bounds import _admission

Item = rerank_pb2.RerankStreamRequest


async def _items(count: int, size: int = 10, pulled: list[str] | None = None) -> AsyncIterator[_Received]:
    for number in range(count):
        if pulled is not None:
            pulled.append(str(number))
        yield _Received(Item(id=str(number)), size)


async def _steps(count: int = 20) -> None:
    """Let the loop run `count` steps: every task goes as far as it can (no timing)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition()` holds (the tasks' own steps, no timing)."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


class Served:
    """The stream served as the servicer serves it: each item runs until `release` is set,
    unless the edge refused it (then answered with its refusal's reason at once)."""

    def __init__(self, items: _StreamItems, window: int) -> None:
        self.items = items
        self.release = asyncio.Event()
        self.started: list[str] = []
        self.answers = answer_concurrently(
            items, self._handle, key=lambda item: item.id, duplicate=lambda item: f"duplicate:{item.id}",
            failed=lambda item, error: f"failed:{item.id}", window=window, sent=items.answered,
        )  # fmt: skip

    async def _handle(self, item: Any) -> str:
        refusal = self.items.refusal(item)
        if refusal is not None:
            return f"refused:{item.id}:{refusal.reason or refusal.code.name}"
        self.started.append(item.id)
        await self.release.wait()
        return f"answer:{item.id}"

    async def collect(self) -> list[str]:
        return [answer async for answer in self.answers]


async def test_an_item_behind_a_full_window_holds_no_share_and_no_bytes_and_is_not_refused() -> None:
    """The item after a full window was read before a window slot was free: it took a
    fair-share count while the window's items ran (and was refused CALLER_LIMITED at a
    share the window alone never passes), and its bytes while it waited."""
    admission, refusals = _admission(slots=4)  # a share of 2
    admission.enter(0, "victim")  # another caller calls
    pulled: list[str] = []
    items = _StreamItems(_items(3, pulled=pulled), admission, idle_timeout=60.0)
    items.identify = lambda: Caller("flood")
    served = Served(items, window=2)  # the window is the caller's share

    collecting = asyncio.create_task(served.collect())
    await _until(lambda: len(served.started) == 2)
    await _steps()  # any step more a read-ahead would take
    while_full = list(pulled), admission.held("flood"), admission.bytes_in_flight
    served.release.set()
    answers = await collecting

    assert while_full == (["0", "1"], 2, 20)
    assert sorted(answers) == ["answer:0", "answer:1", "answer:2"]
    assert refusals == []
    assert (admission.held("flood"), admission.in_flight, admission.bytes_in_flight) == (0, 1, 0)


async def test_an_item_behind_a_full_window_as_the_drain_begins_never_runs() -> None:
    """It had been read before the drain began, so it ran once the window had room, its
    backend call starting after the drain began (which the grace may then cut)."""
    admission, _ = _admission(slots=4)
    drain = _Drain()
    pulled: list[str] = []
    items = _StreamItems(_items(2, pulled=pulled), admission, idle_timeout=60.0, drain=drain)
    items.identify = lambda: Caller("batch")
    served = Served(items, window=1)

    collecting = asyncio.create_task(served.collect())
    await _until(lambda: served.started == ["0"])
    await _steps()
    drain.begin()  # SIGTERM while the first item runs and the second waits behind it
    served.release.set()
    [end] = await asyncio.gather(collecting, return_exceptions=True)  # its first item answered

    assert served.started == ["0"]  # the second never ran
    assert pulled == ["0"]  # nor was it read: the client resends it on a new stream
    assert isinstance(end, ServiceError)  # the stream's end
    assert end.code == grpc.StatusCode.UNAVAILABLE
    items.close()
    assert (admission.in_flight, admission.held("batch"), admission.bytes_in_flight) == (0, 0, 0)


async def test_an_item_waiting_for_byte_budget_as_the_drain_begins_is_answered_unavailable() -> None:
    """It went on to run once the budget had room, after the drain began (an item waiting
    for a slot then was refused, as one read then is)."""
    admission, _ = _admission(slots=4, max_bytes=100)
    await admission.take_bytes(80)  # another call's bytes
    drain = _Drain()
    items = _StreamItems(_items(1, size=60), admission, idle_timeout=60.0, drain=drain)
    items.identify = lambda: Caller("batch")
    reading = asyncio.create_task(anext(items))
    await _until(lambda: admission._freed is not None)  # the item waits for room

    drain.begin()
    admission.give_bytes(80)  # the other call answered: room for it
    item = await reading
    refusal = items.refusal(item)

    assert refusal is not None
    assert refusal.code == grpc.StatusCode.UNAVAILABLE  # as any item read since the drain began
    assert (admission.in_flight, admission.held("batch"), admission.bytes_in_flight) == (0, 0, 0)
    items.answered(item)
    items.close()
    assert (admission.in_flight, admission.held("batch"), admission.bytes_in_flight) == (0, 0, 0)


async def test_items_after_a_reload_that_removed_their_callers_concurrent_limit_are_held_to_the_share() -> (
    None
):
    """A caller with a `concurrent` limit is not held to the fair share (the limit holds it);
    a reload removing the limit left its open streams held to neither: their items kept
    the caller's settings from the stream's start."""
    admission, refusals = _admission(slots=4)  # a share of 2
    admission.enter(0, "ads")  # another caller calls
    now = [Caller("search", limits=CallerLimits(concurrent=50))]
    items = _StreamItems(_items(6), admission, idle_timeout=60.0)
    items.identify = lambda: now[0]
    before = [await anext(items) for _ in range(3)]  # past the share: the limit holds it

    now[0] = Caller("search")  # reloaded: no limit of its own, so the fair share
    after = [await anext(items) for _ in range(3)]
    refused = [item.id for item in after if items.refusal(item) is not None]

    assert [items.refusal(item) for item in before] == [None, None, None]
    assert refused == ["3", "4", "5"]  # it holds 3 slots, past its share of 2
    assert refusals == [FAIR_SHARE] * 3
    for item in before + after:
        items.answered(item)
    assert (admission.held("search"), admission.in_flight, admission.bytes_in_flight) == (0, 1, 0)


async def test_items_after_a_reload_that_renamed_their_caller_count_under_its_new_name() -> None:
    """The stream's items were counted under the name its caller had when it opened, the
    same key's calls on other streams under the new one: two shares for one caller."""
    admission, _ = _admission(slots=8)
    now = [Caller("search")]
    items = _StreamItems(_items(2), admission, idle_timeout=60.0)
    items.identify = lambda: now[0]
    first = await anext(items)
    now[0] = Caller("search-team")  # reloaded: the key is another caller's now
    second = await anext(items)
    during = admission.held("search"), admission.held("search-team"), admission.in_flight

    items.answered(first)
    one_left = admission.held("search"), admission.held("search-team"), admission.in_flight
    items.answered(second)

    assert during == (1, 1, 1)  # one slot of the bound, each item under its caller's name
    assert one_left == (0, 1, 1)
    assert (admission.held("search"), admission.held("search-team"), admission.in_flight) == (0, 0, 0)


async def test_a_stream_closed_after_a_rename_gives_back_each_item_under_its_own_name() -> None:
    admission, _ = _admission(slots=8)
    now = [Caller("search")]
    items = _StreamItems(_items(3), admission, idle_timeout=60.0)
    items.identify = lambda: now[0]
    # Kept, as the servicer keeps an item until it is answered: the edge knows an item in
    # flight by its object's id, which a freed item's successor may be given.
    read = [await anext(items)]
    now[0] = Caller("search-team")
    read += [await anext(items), await anext(items)]

    items.close()

    assert len(read) == 3
    assert (admission.held("search"), admission.held("search-team"), admission.in_flight) == (0, 0, 0)


async def test_an_item_whose_key_a_reload_removed_holds_nothing() -> None:
    admission, _ = _admission(slots=8)
    removed = ServiceError(grpc.StatusCode.UNAUTHENTICATED, "the key is not accepted")

    def identify() -> Caller:
        raise removed

    items = _StreamItems(_items(1), admission, idle_timeout=60.0)
    items.identify = identify
    item = await anext(items)

    assert items.refusal(item) is removed  # the servicer answers it UNAUTHENTICATED
    assert (admission.in_flight, admission.bytes_in_flight) == (0, 0)


async def test_an_items_time_starts_when_it_was_read_not_after_its_wait_for_room() -> None:
    """Its call (and its latency, its span) starts from `arrived`: an item that waited for
    the byte budget (or a slot) reports that wait in its time, as a unary call's does."""
    admission, _ = _admission(slots=4, max_bytes=100)
    await admission.take_bytes(80)  # another call's bytes
    items = _StreamItems(_items(1, size=60), admission, idle_timeout=60.0)
    items.identify = lambda: Caller("batch")
    reading = asyncio.create_task(anext(items))
    await _until(lambda: admission._freed is not None)  # read, and waiting for room
    while_waiting = time.perf_counter()

    admission.give_bytes(80)
    item = await reading
    arrived = items.arrived(item)

    assert arrived is not None
    assert arrived <= while_waiting  # read before the wait, not timed from its end
    assert items.arrived(item) is None  # asked once: nothing kept per item after that
    items.answered(item)
    items.close()
