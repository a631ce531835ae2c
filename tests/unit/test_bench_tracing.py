"""bench/tracing.py reads BENCH_QUICK as the other benchmarks do, and labels a quick run's
report as a smoke run (nothing is measured here)."""

from __future__ import annotations

import pytest

from bench import perf, tracing


@pytest.mark.parametrize(("value", "quick"), [(None, False), ("", False), ("0", False), ("1", True)])
def test_bench_quick_0_is_a_full_run_as_in_the_other_benchmarks(
    monkeypatch: pytest.MonkeyPatch, value: str | None, quick: bool
) -> None:
    if value is None:
        monkeypatch.delenv("BENCH_QUICK", raising=False)
    else:
        monkeypatch.setenv("BENCH_QUICK", value)
    assert tracing.chosen_plan() is (perf.QUICK if quick else perf.FULL)


def measured() -> dict[str, tracing.Measured]:
    return {
        name: tracing.Measured(rps=[100.0], cpu_us=[1000.0], p50=[0.05], p99=[0.1])
        for name in (tracing.OFF, tracing.FULL_SAMPLING, tracing.ONE_PERCENT)
    }


def test_a_quick_runs_report_says_it_is_a_smoke_run_and_a_full_ones_does_not() -> None:
    label = "BENCH_QUICK=1 smoke run, not a record"
    assert label in tracing.report(measured(), perf.QUICK, 1, 60.0)
    assert label not in tracing.report(measured(), perf.FULL, 6, 240.0)
