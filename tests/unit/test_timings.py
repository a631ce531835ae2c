"""Timings travel up with each answer and add up the way the timing metadata promises."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator

import grpc
import pytest

from rerank_service.core.domain import NO_TIMINGS, FailureKind, ServiceError, Timings, combined
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


def test_an_error_is_immutable_and_a_layer_adds_its_timings_and_deployment_to_a_copy() -> None:
    original = ServiceError(grpc.StatusCode.UNAVAILABLE, "down", reason="R", kind=FailureKind.DEPLOYMENT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        original.timings = Timings(1.0)  # type: ignore[misc]

    copy = original.with_timings(Timings(1.0)).at_deployment("a")

    assert (copy.timings, copy.deployment) == (Timings(1.0), "a")
    assert (copy.code, copy.message, copy.reason, copy.kind) == (
        original.code,
        original.message,
        original.reason,
        original.kind,
    )
    assert (original.timings, original.deployment) == (NO_TIMINGS, None)


def test_an_error_passes_through_what_sets_an_exceptions_own_attributes() -> None:
    @contextlib.contextmanager
    def around() -> Iterator[None]:
        yield  # its __exit__ sets the __traceback__ of an exception passing through

    error = ServiceError(grpc.StatusCode.INTERNAL, "boom")
    with pytest.raises(ServiceError) as raised, around():
        raise error
    assert raised.value is error

    error.add_note("noted")
    assert error.__notes__ == ["noted"]


async def test_readiness_wakes_waiters_on_a_change_only() -> None:
    readiness = Readiness()
    waiter = asyncio.create_task(readiness.changed())
    readiness.set(False)  # no change: nobody wakes
    await asyncio.sleep(0)
    assert not waiter.done()

    readiness.set(True)

    assert await asyncio.wait_for(waiter, 1) is True
    assert readiness.ready
