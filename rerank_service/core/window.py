"""Counts over the last few seconds, in slots of a second: cheap enough for every attempt."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# The most slots a window keeps: a longer window has slots of more than a second each, so
# its memory and the walk of `totals` stay this size whatever the window (a window of 1e7
# seconds took a list per second, 1.1 GB per deployment).
MAX_SLOTS = 60


class SlidingCounts:
    """`kinds` counters summed over the last `window` seconds (to the second; a window of
    more than MAX_SLOTS seconds to the width of one of its MAX_SLOTS slots)."""

    def __init__(self, kinds: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = max(1, math.ceil(window))
        self._clock = clock
        slots = min(self.seconds, MAX_SLOTS)
        self._width = self.seconds / slots  # seconds per slot: 1 for a window of MAX_SLOTS or less
        # One slot per width of time: [its number since the clock's zero, count of kind 0, ...].
        self._slots: list[list[int]] = [[-1] + [0] * kinds for _ in range(slots)]

    def add(self, kind: int) -> None:
        tick = self._tick()
        slot = self._slots[tick % len(self._slots)]
        if slot[0] != tick:
            slot[:] = [tick] + [0] * (len(slot) - 1)
        slot[kind + 1] += 1

    def totals(self) -> list[int]:
        oldest = self._tick() - len(self._slots)
        sums = [0] * (len(self._slots[0]) - 1)
        for slot in self._slots:
            if slot[0] > oldest:
                for kind, count in enumerate(slot[1:]):
                    sums[kind] += count
        return sums

    def _tick(self) -> int:
        return int(self._clock() / self._width)
