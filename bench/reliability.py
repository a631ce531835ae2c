"""Reliability report: every fault scenario against a live service, measured.

    make bench-reliability          # or: .venv/bin/python -m bench.reliability

Runs the scenarios of tests/support/fault_scenarios.py (the same ones
tests/integration/test_fault_suite.py asserts) against a real `rerank-service serve
--backend upstream` process in front of the fake upstream (in this process), each
`--runs` times, then the deployment health (ejected, down, probed back), overload and
shutdown sequences. Prints the tables and rewrites them in docs/RELIABILITY.md between
its markers; exits 1 if any scenario broke its promise. `--only breaker` (repeatable)
runs some parts alone and rewrites only their tables (the "Last run" line describes a
full run, so it is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from rerank.v1 import rerank_pb2_grpc

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.support.fault_scenarios import (
    BREAKER_SETTINGS,
    OVERLOAD_FLAGS,
    OVERLOAD_LATENCY,
    RETRY_EVENT,
    SCENARIOS,
    SERVICE_SETTINGS,
    SHUTDOWN_GRACE,
    SHUTDOWN_LATENCY,
    Observation,
    Scenario,
    as_flags,
    drive_overload,
    median,
    open_fds,
    oversized_message_code,
    problems,
    run_breaker,
    run_round,
    sigterm_in_flight,
)
from tests.support.process import ServiceProcess

KEY = "bench-upstream-key"
DOC = Path(__file__).resolve().parent.parent / "docs" / "RELIABILITY.md"
ENV = {"RERANK_UPSTREAM_API_KEY": KEY}


def serve_args(upstream: FakeUpstream, settings: Mapping[str, Any]) -> list[str]:
    return ["--backend", "upstream", "--upstream-url", upstream.url, *as_flags(settings)]


def retries_logged(service: ServiceProcess) -> int:
    return sum(1 for event in service.events() if event.get("event") == RETRY_EVENT)


def settle(service: ServiceProcess, upstream: FakeUpstream, baseline: tuple[int, int]) -> tuple[int, int]:
    """(fds, upstream connections) once they are back to `baseline`, or after 3 s."""
    assert service.process is not None
    end = time.monotonic() + 3
    while True:
        now = (open_fds(service.process.pid), upstream.open_connections)
        if (now[0] <= baseline[0] and now[1] <= baseline[1]) or time.monotonic() > end:
            return now
        time.sleep(0.02)


def measure_scenario(
    service: ServiceProcess, upstream: FakeUpstream, scenario: Scenario, runs: int
) -> tuple[list[Observation], list[str], str]:
    """Every run's observation, the problems found, and what was left behind."""
    assert service.process is not None
    with grpc.insecure_channel(service.target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        seen = [run_round(stub, upstream, scenario, lambda: retries_logged(service))]
        upstream.wait_for(lambda fake: fake.open_connections <= 1, 1)
        baseline = (open_fds(service.process.pid), upstream.open_connections)
        seen += [
            run_round(stub, upstream, scenario, lambda: retries_logged(service)) for _ in range(runs - 1)
        ]
        after = settle(service, upstream, baseline)
    found = sorted({problem for observation in seen for problem in problems(scenario, observation)})
    fds, connections = after[0] - baseline[0], after[1] - baseline[1]
    left = "nothing" if fds <= 0 and connections <= 0 else f"{fds:+d} fds, {connections:+d} connections"
    if left != "nothing":
        found.append(f"left behind: {left}")
    return seen, found, left


def counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {name}" for name, count in sorted(counter.items(), key=lambda item: -item[1]))


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 0.1 else f"{value * 1000:.0f} ms"


def retry_info(seen: list[Observation]) -> str:
    """The caller cell's RetryInfo part: the first delay any run got, or "" when none got one."""
    delays = [observation.retry_delay for observation in seen if observation.retry_delay is not None]
    return f", RetryInfo {delays[0]:g} s" if delays else ""


def scenario_table(
    upstream: FakeUpstream, runs: int, scenarios: tuple[Scenario, ...] = SCENARIOS
) -> tuple[str, list[str]]:
    rows = [
        "| scenario | the upstream | the caller sees | attempts | time (median / max) | deadline "
        "| left behind |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    failures = []
    for scenario in scenarios:
        settings = {**SERVICE_SETTINGS, **scenario.settings}
        # A fresh service for each scenario, as tests/integration/test_fault_suite.py does:
        # the route's retry budget (10 retries per 10 s) would otherwise be spent by the
        # scenarios before, and later ones would make one attempt instead of three.
        with ServiceProcess(serve_args(upstream, settings), env=ENV) as service:
            seen, found, left = measure_scenario(service, upstream, scenario, runs)
        durations = [observation.seconds for observation in seen]
        outcomes = sorted({observation.seen for observation in seen})
        attempts = sorted({observation.attempts for observation in seen})
        caller = " or ".join(f"`{outcome}`" for outcome in outcomes) + retry_info(seen)
        deadline = f"{scenario.deadline:g} s"
        if "upstream_timeout" in scenario.settings:
            deadline += f" (upstream timeout {scenario.settings['upstream_timeout']:g} s)"
        rows.append(
            f"| {scenario.name} | {scenario.upstream} | {caller} | {'/'.join(map(str, attempts))} "
            f"| {seconds(median(durations))} / {seconds(max(durations))} | {deadline} | {left} |"
        )
        failures += [f"{scenario.name}: {problem}" for problem in found]
        print(rows[-1], flush=True)
    return "\n".join(rows), failures


def breaker_table(upstream: FakeUpstream) -> tuple[str, list[str]]:
    settings = {**SERVICE_SETTINGS, **BREAKER_SETTINGS}
    with (
        ServiceProcess(serve_args(upstream, settings), env=ENV) as service,
        grpc.insecure_channel(service.target) as channel,
    ):
        steps = run_breaker(channel, upstream)
    upstream.reset()
    rows = [
        "| step | the upstream | the caller sees | attempts | time | RerankService health | server health |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for step in steps:
        caller = f"`{step.seen.seen}`"
        if step.seen.retry_delay is not None:
            caller += f", RetryInfo {step.seen.retry_delay:g} s"
        rows.append(
            f"| {step.name} | {step.upstream} | {caller} | {step.seen.attempts} "
            f"| {seconds(step.seen.seconds)} | {step.health} | {step.liveness} |"
        )
    return "\n".join(rows), [problem for step in steps for problem in step.problems]


def overload_table() -> tuple[str, list[str]]:
    capacity = 8 / OVERLOAD_LATENCY
    with (
        FakeUpstream(api_key=KEY, latency=OVERLOAD_LATENCY, record=False) as upstream,
        ServiceProcess(serve_args(upstream, {}) + list(OVERLOAD_FLAGS), env=ENV) as service,
    ):
        assert service.process is not None
        result = asyncio.run(drive_overload(service.target, service.process.pid, 2 * capacity, 3.0))
        oversized, after_oversized = oversized_message_code(service.target, 100_000)
    refused = result.codes["RESOURCE_EXHAUSTED OVERLOADED"]
    mib = 1024 * 1024
    rows = [
        "| measure | value |",
        "| --- | --- |",
        f"| offered | {result.sent} calls in {result.seconds:g} s ({result.rate:g}/s, twice the "
        f"{capacity:g}/s capacity) |",
        f"| accepted, all OK | {result.codes['OK']} ({result.codes['OK'] / result.seconds:.1f}/s); "
        f"median {seconds(median(result.ok_seconds))}, max {seconds(max(result.ok_seconds))} |",
        f"| refused, `RESOURCE_EXHAUSTED OVERLOADED` | {refused}; median "
        f"{seconds(median(result.refused_seconds))}, max {seconds(max(result.refused_seconds or [0]))} |",
        f"| any other outcome | {result.sent - result.codes['OK'] - refused} |",
        f"| health checks during the burst | {counts(result.health)} |",
        f"| server RSS: before / peak / after | {result.rss_before / mib:.1f} / {result.rss_peak / mib:.1f} "
        f"/ {result.rss_after / mib:.1f} MiB |",
        f"| the next call after the burst | {result.recovery_code} in {seconds(result.recovery_seconds)} |",
        f"| a 100 KB message (limit 64 KiB), then a normal call | {oversized}, then {after_oversized} |",
    ]
    found = []
    if set(result.codes) != {"OK", "RESOURCE_EXHAUSTED OVERLOADED"}:
        found.append(f"overload: unexpected outcomes {counts(result.codes)}")
    if max(result.refused_seconds or [1.0]) >= 0.1:
        found.append("overload: a refusal took 100 ms or more")
    if result.recovery_code != "OK" or (oversized, after_oversized) != ("RESOURCE_EXHAUSTED", "OK"):
        found.append("overload: no recovery, or the oversized message was not refused")
    return "\n".join(rows), found


def shutdown_table() -> tuple[str, list[str]]:
    calls, items = 50, 5
    with FakeUpstream(api_key=KEY, latency=SHUTDOWN_LATENCY) as upstream:
        args = serve_args(upstream, {"shutdown_grace": SHUTDOWN_GRACE})
        with ServiceProcess(args, env=ENV) as service:
            result = asyncio.run(sigterm_in_flight(service, upstream, calls, items))
    rows = [
        "| measure | value |",
        "| --- | --- |",
        f"| in flight at the upstream when SIGTERM arrived | {result.in_flight_at_signal} "
        f"({calls} unary calls, {items} stream items) |",
        f"| unary calls | {counts(result.unary)} |",
        f"| stream items; the stream's status | {counts(result.stream_answers)}; {result.stream_code} |",
        f"| upstream requests cut | {result.upstream_abandoned} |",
        f"| health checks after SIGTERM | {' → '.join(result.health_after_signal)} |",
        f"| a call started after the drain began | {result.late_call} |",
        f"| exit code; SIGTERM to exit | {result.exit_code}; {seconds(result.exit_seconds)} "
        f"(upstream latency {SHUTDOWN_LATENCY:g} s, grace {SHUTDOWN_GRACE:g} s) |",
    ]
    found = []
    if result.unary != {"OK": calls} or result.stream_answers != {"OK": items}:
        found.append("shutdown: a call or stream item in flight did not succeed")
    if result.stream_code != "OK" or result.exit_code != 0 or result.upstream_abandoned:
        found.append("shutdown: the stream was cut, an upstream call was cut, or the exit code was not 0")
    return "\n".join(rows), found


def replace_block(text: str, name: str, content: str) -> str:
    """Put `content` between `<!-- NAME:start -->` and `<!-- NAME:end -->`."""
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(\n<!-- {name}:end -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} has no {name} markers")
    return pattern.sub(lambda match: match.group(1) + content + match.group(2), text)


def machine(setup: str) -> str:
    """The "Last run" line of a report: when, on what, and how it was set up."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Last run: {when}; {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, grpcio {grpc.__version__}; {setup}"
    )


def publish(blocks: dict[str, str], write: bool, failures: list[str]) -> None:
    """Print the tables, rewrite them in docs/RELIABILITY.md, exit 1 on a broken promise."""
    for name, block in blocks.items():
        print(f"\n## {name}\n\n{block}")
    if write:
        text = DOC.read_text(encoding="utf-8")
        for name, block in blocks.items():
            text = replace_block(text, name, block)
        DOC.write_text(text, encoding="utf-8")
        print(f"\nwrote {DOC}")
    if failures:
        print("\nbroken promises:\n" + "\n".join(f"- {failure}" for failure in failures), file=sys.stderr)
        raise SystemExit(1)


PARTS = ("scenarios", "breaker", "overload", "shutdown")
# A scenario's calls share one service, whose route may retry 10 times per 10 s (at least):
# five calls of a scenario that retries twice (and its valid call after each) fit, a sixth
# would be refused its retries and break the promise of three attempts.
MAX_RUNS = 5


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=MAX_RUNS, help=f"calls per scenario (at least 2, at most {MAX_RUNS})"
    )
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument(
        "--only", choices=PARTS, action="append", help="run only these parts (repeatable); default: all"
    )
    args = parser.parse_args()
    if args.runs > MAX_RUNS:
        parser.error(f"--runs: at most {MAX_RUNS} (the retry budget of the service a scenario runs on)")
    parts = args.only or list(PARTS)

    blocks: dict[str, str] = {}
    failures: list[str] = []
    if "scenarios" in parts or "breaker" in parts:
        with FakeUpstream(api_key=KEY, models=("qwen3-rerank",)) as upstream:
            if "scenarios" in parts:
                blocks["scenarios"], found = scenario_table(upstream, max(2, args.runs))
                failures += found
            if "breaker" in parts:
                blocks["breaker"], found = breaker_table(upstream)
                failures += found
    if "overload" in parts:
        blocks["overload"], found = overload_table()
        failures += found
    if "shutdown" in parts:
        blocks["shutdown"], found = shutdown_table()
        failures += found

    if set(parts) == set(PARTS):
        setup = (
            "loopback, a real `rerank-service serve` process, the fake upstream and the client in the "
            f"benchmark's process; {max(2, args.runs)} calls per scenario."
        )
        blocks = {"machine": machine(setup), **blocks}
    publish(blocks, not args.no_write, failures)


if __name__ == "__main__":
    main()
