"""answer_concurrently: a window of items in flight, answers out of order, nothing lost."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from rerank_service.core.stream_window import answer_concurrently

Item = tuple[str, float]  # (id, seconds the work takes)


class Tracker:
    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.started: list[str] = []
        self.cancelled: list[str] = []

    async def handle(self, item: Item) -> str:
        key, seconds = item
        self.running += 1
        self.most = max(self.most, self.running)
        self.started.append(key)
        try:
            await asyncio.sleep(seconds)  # the item's work, not synchronisation
            if key.startswith("boom"):
                raise RuntimeError("handler failed")
            return f"answer:{key}"
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        finally:
            self.running -= 1


async def items_of(items: list[Item], pulled: list[str] | None = None) -> AsyncIterator[Item]:
    for item in items:
        if pulled is not None:
            pulled.append(item[0])
        yield item


def answers(tracker: Tracker, source: AsyncIterator[Item], window: int) -> AsyncGenerator[str, None]:
    return answer_concurrently(
        source,
        tracker.handle,
        key=lambda item: item[0],
        duplicate=lambda item: f"duplicate:{item[0]}",
        failed=lambda item, error: f"failed:{item[0]}:{type(error).__name__}",
        window=window,
    )


async def test_every_item_is_answered_once_as_it_finishes() -> None:
    rng = random.Random(3)
    items = [(f"id{i}", rng.uniform(0, 0.05)) for i in range(40)]
    tracker = Tracker()

    got = [answer async for answer in answers(tracker, items_of(items), window=40)]

    assert sorted(got) == sorted(f"answer:{key}" for key, _ in items)
    assert got != [f"answer:{key}" for key, _ in items]  # not in input order


async def test_answers_come_in_completion_order() -> None:
    items = [(f"id{i}", (10 - i) * 0.02) for i in range(10)]  # the first takes longest

    got = [answer async for answer in answers(Tracker(), items_of(items), window=10)]

    assert got == [f"answer:id{i}" for i in reversed(range(10))]


async def test_no_more_than_the_window_runs_at_once_and_reading_waits() -> None:
    items = [(f"id{i}", 0.02) for i in range(30)]
    tracker, pulled = Tracker(), list[str]()
    stream = answers(tracker, items_of(items, pulled), window=4)

    first = await stream.__anext__()
    await asyncio.sleep(0.01)  # a moment in which a wrong read-ahead would happen: nothing to wait for
    read_before_consuming_more = len(pulled)
    rest = [answer async for answer in stream]

    assert tracker.most == 4
    assert read_before_consuming_more <= 4 + 2  # unsent answers hold their slots: reading pauses
    assert len([first, *rest]) == 30


async def test_a_duplicate_id_in_flight_is_answered_as_such_and_the_rest_goes_on() -> None:
    items = [("a", 0.05), ("a", 0.0), ("b", 0.0)]

    got = [answer async for answer in answers(Tracker(), items_of(items), window=8)]

    assert sorted(got) == ["answer:a", "answer:b", "duplicate:a"]


async def test_an_id_may_be_reused_once_its_answer_is_out() -> None:
    items = [("a", 0.0), ("a", 0.0)]

    got = [answer async for answer in answers(Tracker(), items_of(items), window=1)]

    assert got == ["answer:a", "answer:a"]


async def test_a_failing_item_is_answered_with_its_error_and_the_stream_goes_on() -> None:
    items = [("ok1", 0.0), ("boom", 0.0), ("ok2", 0.01)]

    got = [answer async for answer in answers(Tracker(), items_of(items), window=8)]

    assert sorted(got) == ["answer:ok1", "answer:ok2", "failed:boom:RuntimeError"]


async def test_items_in_flight_are_finished_after_the_input_ends() -> None:
    items = [("slow", 0.1), ("fast", 0.0)]

    got = [answer async for answer in answers(Tracker(), items_of(items), window=8)]

    assert got == ["answer:fast", "answer:slow"]


async def test_stopping_early_cancels_the_items_still_running() -> None:
    items = [("quick", 0.0), ("long1", 5.0), ("long2", 5.0)]
    tracker = Tracker()
    stream = answers(tracker, items_of(items), window=8)

    assert await stream.__anext__() == "answer:quick"
    await stream.aclose()  # what a cancelled RPC does to the servicer's generator

    assert sorted(tracker.cancelled) == ["long1", "long2"]
    assert tracker.running == 0


async def test_a_failure_reading_the_input_ends_the_stream_with_it() -> None:
    async def broken() -> AsyncIterator[Item]:
        yield ("a", 0.0)
        raise ConnectionError("stream reset")

    with pytest.raises(ConnectionError, match="stream reset"):
        _ = [answer async for answer in answers(Tracker(), broken(), window=8)]


async def test_an_item_is_read_only_once_a_window_slot_is_free_for_it() -> None:
    """The next item was read, then waited for a slot: one item past the window was read
    while the window was full, holding what reading takes (at the edge: its bytes, and a
    count against its caller's fair share that could refuse it)."""
    release, both_started = asyncio.Event(), asyncio.Event()
    started: list[str] = []

    async def handle(item: Item) -> str:
        started.append(item[0])
        if len(started) == 2:
            both_started.set()
        await release.wait()
        return f"answer:{item[0]}"

    pulled: list[str] = []
    stream = answer_concurrently(
        items_of([("a", 0.0), ("b", 0.0), ("c", 0.0)], pulled), handle,
        key=lambda item: item[0], duplicate=lambda item: "duplicate", failed=lambda item, error: "failed",
        window=2,
    )  # fmt: skip
    first = asyncio.ensure_future(anext(stream))
    await both_started.wait()
    for _ in range(10):  # the loop's own steps: any a read-ahead would take (no timing)
        await asyncio.sleep(0)
    pulled_while_full = list(pulled)
    release.set()
    got = [await first, *[answer async for answer in stream]]

    assert pulled_while_full == ["a", "b"]
    assert sorted(got) == ["answer:a", "answer:b", "answer:c"]
