"""Timings travel up with each answer and add up the way the timing metadata promises."""

from __future__ import annotations

import asyncio

import pytest

from rerank_service.core.domain import Timings, combined
from rerank_service.core.readiness import Readiness


def test_parallel_upstream_attempts_count_once_as_wall_time_and_waits_between_retries_not_at_all() -> None:
    chunk_a = Timings(upstream_spans=((10.0, 11.0),))
    # Chunk B overlaps A, then retries after an 8 s wait.
    chunk_b = Timings(upstream_spans=((10.5, 12.0), (20.0, 20.5)))

    assert combined([chunk_a, chunk_b]).upstream_seconds == pytest.approx(2.5)


def test_a_span_inside_another_adds_nothing() -> None:
    assert Timings(upstream_spans=((1.0, 5.0), (2.0, 3.0))).upstream_seconds == pytest.approx(4.0)


def test_the_queue_time_of_a_split_call_is_its_longest_wait_and_model_time_adds_up() -> None:
    chunks = [Timings(0.0, 0.2), Timings(0.1).waited(0.2), Timings(0.1, 0.3)]

    total = combined(chunks)

    assert total.queue_seconds == pytest.approx(0.3)
    assert total.inference_seconds == pytest.approx(0.5)


def test_one_chunk_keeps_its_timings() -> None:
    only = Timings(0.1, 0.2, ((1.0, 2.0),))
    assert combined([only]) is only


async def test_readiness_wakes_waiters_on_a_change_only() -> None:
    readiness = Readiness()
    waiter = asyncio.create_task(readiness.changed())
    readiness.set(False)  # no change: nobody wakes
    await asyncio.sleep(0)
    assert not waiter.done()

    readiness.set(True)

    assert await asyncio.wait_for(waiter, 1) is True
    assert readiness.ready
