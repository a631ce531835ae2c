"""RetryBudget: a route's retries and fallbacks, as a share of its calls over a sliding window."""

from __future__ import annotations

from rerank_service.core.retry_budget import RetryBudget


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def spendable(budget: RetryBudget, most: int = 1000) -> int:
    """How many extra attempts the budget grants now (spending them)."""
    granted = 0
    while granted < most and budget.try_spend():
        granted += 1
    return granted


def test_the_floor_allows_ten_extra_attempts_on_a_route_with_no_calls() -> None:
    budget = RetryBudget(share=0.2, floor=10, clock=Clock())

    assert spendable(budget) == 10
    assert not budget.try_spend()  # spent: the eleventh is refused, and stays refused


def test_without_a_floor_a_route_with_no_calls_may_not_retry_at_all() -> None:
    budget = RetryBudget(share=0.2, floor=0, clock=Clock())

    assert not budget.try_spend()


def test_extra_attempts_are_a_share_of_the_calls_in_the_window() -> None:
    budget = RetryBudget(share=0.2, floor=0, clock=Clock())
    for _ in range(100):
        budget.called()

    assert spendable(budget) == 20


def test_the_larger_of_the_share_and_the_floor_applies() -> None:
    few = RetryBudget(share=0.2, floor=10, clock=Clock())
    many = RetryBudget(share=0.2, floor=10, clock=Clock())
    for _ in range(20):
        few.called()  # a share of 4: the floor of 10 applies
    for _ in range(200):
        many.called()  # a share of 40: more than the floor

    assert (spendable(few), spendable(many)) == (10, 40)


def test_more_calls_grant_more_extra_attempts_as_they_arrive() -> None:
    budget = RetryBudget(share=0.5, floor=0, clock=Clock())
    for _ in range(4):
        budget.called()
    assert spendable(budget) == 2

    for _ in range(2):
        budget.called()
    assert spendable(budget) == 1  # 6 calls: 3 extra in all, 2 already spent


def test_a_share_of_zero_and_no_floor_grants_nothing_however_busy_the_route() -> None:
    budget = RetryBudget(share=0, floor=0, clock=Clock())
    for _ in range(1000):
        budget.called()

    assert not budget.try_spend()


def test_spent_attempts_expire_with_the_window_and_the_floor_is_granted_again() -> None:
    clock = Clock()
    budget = RetryBudget(share=0.2, floor=10, window=10.0, clock=clock)
    assert spendable(budget) == 10

    clock.now += 9
    assert not budget.try_spend()  # still within the window

    clock.now += 1.5  # the second the attempts were spent in has left the window
    assert spendable(budget) == 10


def test_old_calls_leave_the_window_and_take_their_share_with_them() -> None:
    clock = Clock(1000.0)
    budget = RetryBudget(share=0.5, floor=0, window=10.0, clock=clock)
    for _ in range(20):
        budget.called()  # at second 1000

    clock.now = 1005.0
    for _ in range(4):
        budget.called()  # at second 1005
    clock.now = 1010.0  # second 1000 is out of the last ten: only the 4 later calls count

    assert spendable(budget) == 2


def test_extra_attempts_spent_earlier_in_the_window_still_count_against_it() -> None:
    clock = Clock(1000.0)
    budget = RetryBudget(share=0.5, floor=0, window=10.0, clock=clock)
    for _ in range(10):
        budget.called()
    assert spendable(budget) == 5

    clock.now = 1004.0
    for _ in range(2):
        budget.called()  # 12 calls in the window: 6 extra, 5 of them spent 4 s ago

    assert spendable(budget) == 1
