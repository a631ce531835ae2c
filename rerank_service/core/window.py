"""Counts over the last few seconds, in one-second slots: cheap enough for every attempt."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class SlidingCounts:
    """`kinds` counters summed over the last `window` seconds (to the second)."""

    def __init__(self, kinds: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = max(1, math.ceil(window))
        self._clock = clock
        # One slot per second of the window: [second, count of kind 0, count of kind 1, ...].
        self._slots: list[list[int]] = [[-1] + [0] * kinds for _ in range(self.seconds)]

    def add(self, kind: int) -> None:
        second = int(self._clock())
        slot = self._slots[second % self.seconds]
        if slot[0] != second:
            slot[:] = [second] + [0] * (len(slot) - 1)
        slot[kind + 1] += 1

    def totals(self) -> list[int]:
        oldest = int(self._clock()) - self.seconds
        sums = [0] * (len(self._slots[0]) - 1)
        for slot in self._slots:
            if slot[0] > oldest:
                for kind, count in enumerate(slot[1:]):
                    sums[kind] += count
        return sums
