"""`make bench-reliability`'s scenario table holds the promises the fault suite asserts.

The fault suite (test_fault_suite.py) runs each scenario on a server of its own; the
benchmark runs them one after another against real `rerank-service serve` processes. A
route retries at most 10 times per 10 s (its retry budget), so scenarios sharing a service
left the later ones one attempt instead of three, and the benchmark failed on a tree whose
tests passed. Cheap: two short scenarios, a process each.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from bench.reliability import KEY, MAX_RUNS, retry_info, scenario_table
from rerank_service.testing.fake_upstream import FakeUpstream
from tests.support.fault_scenarios import SCENARIOS, Observation, Scenario


@pytest.fixture
def bench_upstream() -> Iterator[FakeUpstream]:
    """The fake upstream as the benchmark sets it up (its key, its model)."""
    with FakeUpstream(api_key=KEY, models=("qwen3-rerank",)) as upstream:
        yield upstream


def by_name(name: str) -> Scenario:
    return next(scenario for scenario in SCENARIOS if scenario.name == name)


def test_a_retrying_scenario_run_twice_in_a_row_keeps_its_three_attempts(
    bench_upstream: FakeUpstream,
) -> None:
    scenario = by_name("503 on every attempt")
    assert scenario.attempts == 3
    # Twice MAX_RUNS calls retrying twice each: 20 retries, twice what one service's budget
    # allows in 10 s; each run of the scenario must still see all three attempts.
    table, failures = scenario_table(bench_upstream, MAX_RUNS, (scenario, scenario))

    # Durations are the machine's; the attempts and the outcome are the promise here.
    assert [failure for failure in failures if " took " not in failure] == []
    rows = [line for line in table.splitlines() if line.startswith(f"| {scenario.name} |")]
    assert len(rows) == 2
    assert all("| `UNAVAILABLE UPSTREAM_UNAVAILABLE` | 3 |" in row for row in rows)


def observation(retry_delay: float | None) -> Observation:
    return Observation(grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED", retry_delay, 1, 0.01)


def test_the_retry_info_cell_names_the_first_delay_seen_even_when_the_first_run_had_none() -> None:
    assert retry_info([observation(None), observation(30.0), observation(2.0)]) == ", RetryInfo 30 s"
    assert retry_info([observation(1.5)]) == ", RetryInfo 1.5 s"
    assert retry_info([observation(None), observation(None)]) == ""
