"""SlidingCounts: counts over the last seconds of a window, in a bounded number of slots."""

from __future__ import annotations

from rerank_service.core.window import MAX_SLOTS, SlidingCounts


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_count_is_kept_for_the_window_to_the_second_then_dropped() -> None:
    clock = Clock(1000.0)
    counts = SlidingCounts(2, 10, clock)
    counts.add(0)
    counts.add(1)
    clock.now = 1005.5
    counts.add(1)

    assert counts.totals() == [1, 2]
    clock.now = 1009.9  # second 1000 is still among the last 10
    assert counts.totals() == [1, 2]
    clock.now = 1010.0
    assert counts.totals() == [0, 1]
    clock.now = 1016.0
    assert counts.totals() == [0, 0]


def test_a_long_window_keeps_a_bounded_number_of_slots_and_still_counts_its_span() -> None:
    """A slot per second of the window was a list per second: a window of 1e7 s took 1.1 GB
    and 14 s per deployment, 1e12 s a MemoryError."""
    clock = Clock(5_000_000.0)
    counts = SlidingCounts(2, 1e6, clock)

    assert len(counts._slots) == MAX_SLOTS
    counts.add(0)
    clock.now += 900_000  # within the window
    counts.add(1)
    assert counts.totals() == [1, 1]
    clock.now += 200_000  # the first count is past the window, the second is not
    assert counts.totals() == [0, 1]
    clock.now += 1_000_000
    assert counts.totals() == [0, 0]
    assert counts.seconds == 1_000_000


def test_a_window_of_max_slots_seconds_or_less_keeps_a_slot_a_second() -> None:
    clock = Clock(0.0)
    counts = SlidingCounts(1, MAX_SLOTS, clock)
    for second in range(MAX_SLOTS):
        clock.now = float(second)
        counts.add(0)

    assert len(counts._slots) == MAX_SLOTS
    assert counts.totals() == [MAX_SLOTS]
    clock.now = float(MAX_SLOTS)  # second 0 leaves the window, alone
    assert counts.totals() == [MAX_SLOTS - 1]
