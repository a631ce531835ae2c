"""Waiting on a condition instead of sleeping for a guess: tests never depend on timing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], bool],
    timeout: float = 10.0,
    interval: float = 0.01,
    *,
    what: str | None = None,
) -> bool:
    """Whether `condition()` became true within `timeout` seconds (polled every `interval`).

    With `what`, a condition still false at the timeout fails the test, naming it: the
    timeout is then a bound for a broken server, not a timing the test relies on.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            if what is not None:
                raise AssertionError(f"{what}: not within {timeout:g} s")
            return False
        time.sleep(interval)
    return True


async def wait_until_async(
    condition: Callable[[], bool],
    within: float = 10.0,
    interval: float = 0.01,
    *,
    what: str | None = None,
) -> bool:
    """`wait_until` for a test on an event loop: it polls without blocking the loop, so the
    tasks that make the condition true go on running meanwhile."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            if what is not None:
                raise AssertionError(f"{what}: not within {within:g} s")
            return False
        await asyncio.sleep(interval)
    return True
