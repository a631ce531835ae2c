"""What tracing costs a call: the service with tracing off, on with every call sampled,
and on with 1% sampled, exporting to a real Jaeger.

    make bench-tracing                  # or: .venv/bin/python -m bench.tracing
    BENCH_QUICK=1 make bench-tracing    # a short smoke run (its section to bench/results/tracing/ only)

Three `rerank-service serve --backend upstream` processes with their defaults (the score
cache off, so every call goes upstream: a server span and an attempt span each; its route
has one deployment, so no route span), in front of bench/perf.py's nginx fast upstream, 20 documents a call,
c=64 (ghz, as bench/perf.py drives the service):

- off: no OTLP endpoint (today's call path);
- sampled 1.0: `OTEL_TRACES_SAMPLER=traceidratio`, `OTEL_TRACES_SAMPLER_ARG=1.0`;
- sampled 0.01: the same at 0.01.

The traced ones export over OTLP/gRPC to one Jaeger (all-in-one, in memory:
tests/support/jaeger_server.py; `make jaeger` builds it). Their measured runs alternate,
round after round, the order reversed every other round, so machine noise falls on all
alike; each figure is the mean of the rounds. CPU per call: utime + stime of the
service's whole process (the exporter's thread included) over the measured run, divided
by the calls. Each traced service's spans exported and dropped are read from its /metrics.

The generated part of docs/PERFORMANCE.md (between its bench-tracing markers) is rewritten
(a quick run writes it to bench/results/tracing/PERFORMANCE-quick.md instead); raw ghz
reports land beside bench/perf.py's, in bench/results/perf/tracing-20-c64-*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import perf
from tests.support.jaeger_server import JaegerServer, jaeger_binary
from tests.support.process import ServiceProcess
from tests.support.scrape import scrape, value

RESULTS = perf.ROOT / "bench" / "results" / "tracing"
BEGIN, END = "<!-- bench-tracing:begin -->", "<!-- bench-tracing:end -->"
DOCUMENTS = 20
CONCURRENCY = 64
OFF, FULL_SAMPLING, ONE_PERCENT = "off", "sampled 1.0", "sampled 0.01"
# CPU per call against tracing off, at most (the goals).
GOALS = {FULL_SAMPLING: 1.15, ONE_PERCENT: 1.03}
SAMPLING = {FULL_SAMPLING: "1.0", ONE_PERCENT: "0.01"}


@dataclass
class Measured:
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    errors: int = 0
    exported: float = 0.0
    dropped: float = 0.0


def environment(name: str, jaeger: JaegerServer) -> dict[str, str]:
    if name == OFF:
        return {}
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_grpc_endpoint,
        "OTEL_SERVICE_NAME": f"bench-tracing-{name.replace(' ', '-')}",
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": SAMPLING[name],
    }


@contextlib.contextmanager
def services(url: str, base_port: int, jaeger: JaegerServer) -> Iterator[dict[str, ServiceProcess]]:
    with contextlib.ExitStack() as stack:
        running: dict[str, ServiceProcess] = {}
        for offset, name in enumerate((OFF, FULL_SAMPLING, ONE_PERCENT), start=1):
            running[name] = stack.enter_context(
                perf.service_process(
                    base_port + offset, url, flags=["--metrics-port", "0"], env=environment(name, jaeger)
                )
            )
        yield running


def settle(process: ServiceProcess, timeout: float = 30.0) -> None:
    """Wait until the service's exporter has sent what it queued (its count of spans
    exported and dropped holds still for a second), so that its export does not run
    during the next service's measured run."""
    port = metrics_port(process)

    def sent() -> float:
        samples = scrape(port)
        dropped = sum(
            value(samples, "rerank_trace_spans_dropped_total", reason=reason)
            for reason in ("export_failed", "queue_full")
        )
        return value(samples, "rerank_trace_spans_exported_total") + dropped

    deadline = time.monotonic() + timeout
    last = sent()
    while time.monotonic() < deadline:
        time.sleep(1.0)  # the batch processor sends every OTEL_BSP_SCHEDULE_DELAY (5 s) or 512 spans
        now = sent()
        if now == last:
            return
        last = now


def metrics_port(process: ServiceProcess) -> int:
    serving = next(event for event in process.events() if event.get("event") == "serving")
    return int(serving["metrics_port"])


def run(plan: perf.Plan, rounds: int, base_port: int) -> tuple[dict[str, Measured], float]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    perf.RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    measured = {name: Measured() for name in (OFF, FULL_SAMPLING, ONE_PERCENT)}
    with (
        JaegerServer() as jaeger,
        perf.nginx({DOCUMENTS: base_port}),
        services(f"http://127.0.0.1:{base_port}", base_port, jaeger) as running,
    ):
        ports = {name: int(process.port or 0) for name, process in running.items()}
        for port in ports.values():
            perf.check_answer(port, DOCUMENTS)
        order = list(running)
        for round_number in range(rounds):
            for name in order if round_number % 2 == 0 else order[::-1]:
                process = running[name]
                assert process.process is not None
                point = perf.measure_grpc(
                    "tracing",
                    name,
                    process.process.pid,
                    ports[name],
                    DOCUMENTS,
                    CONCURRENCY,
                    plan,
                    slow=False,
                )
                perf.show(point)
                if name != OFF:  # its last spans sent before the next service's run: theirs alone
                    settle(process)
                found = measured[name]
                found.rps.append(point.rps)
                found.cpu_us.append(point.cpu_us or 0.0)
                found.p50.append(point.p50)
                found.p99.append(point.p99)
                found.errors += point.errors
        for name, process in running.items():
            samples = scrape(metrics_port(process))
            measured[name].exported = value(samples, "rerank_trace_spans_exported_total")
            measured[name].dropped = sum(
                value(samples, "rerank_trace_spans_dropped_total", reason=reason)
                for reason in ("export_failed", "queue_full")
            )
    return measured, time.monotonic() - started


def report(measured: dict[str, Measured], plan: perf.Plan, rounds: int, seconds: float) -> str:
    off = statistics.mean(measured[OFF].cpu_us)
    # Each round measures the three services one after another: the ratio within a round
    # is steadier than the ratio of means when the machine's load drifts.
    paired = {
        name: statistics.median(
            cpu / base for cpu, base in zip(found.cpu_us, measured[OFF].cpu_us, strict=True)
        )
        for name, found in measured.items()
    }
    lines = [
        BEGIN,
        "## Tracing",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds / 60:.1f} minutes"
        + (" — **BENCH_QUICK=1 smoke run, not a record**" if plan.quick else "")
        + f". Machine: {perf.machine()}.",
        "",
        "`rerank-service serve --backend upstream` with its defaults and the score cache off (every call "
        "sent upstream: a server and an attempt span; a route of one deployment has no span of its own), "
        "20 documents a call, c=64, "
        "in front of nginx's static answer. Services: **off** (no OTLP endpoint), **sampled 1.0** and "
        "**sampled 0.01** (`OTEL_TRACES_SAMPLER=traceidratio`), both exporting over OTLP/gRPC to one "
        "Jaeger all-in-one (in memory). Their measured runs alternate, the order reversed every other "
        f"round: per run {plan.warmup:g} s warm-up, {plan.seconds:g} s measured by ghz (`--cpus 1`); the "
        f"mean of {rounds} rounds (range in brackets). CPU per call: utime + stime of the service's "
        "process (the exporter's thread included) over the measured run, divided by the calls; after "
        "a traced service's run the next waits until it has sent its spans. `same round, median`: "
        "the median over the rounds of the service's CPU per call over the untraced one's in the same "
        "round (the goal is judged on it: the machine's load drifts between rounds). "
        "docs/OBSERVABILITY.md#tracing says what the spans are.",
        "",
        "| service | requests/s | p50 ms | p99 ms | CPU-µs/call | CPU vs off | same round, median | goal | "
        "spans exported | spans dropped | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, found in measured.items():
        cpu = statistics.mean(found.cpu_us)
        ratio = "-" if name == OFF else f"{cpu / off:.3f}x"
        same_round = "-" if name == OFF else f"{paired[name]:.3f}x"
        goal = GOALS.get(name)
        verdict = "-" if goal is None else f"≤ {goal:g}x: {'met' if paired[name] <= goal else '**not met**'}"
        traced = name != OFF
        lines.append(
            f"| {name} | {statistics.mean(found.rps):,.0f} | {statistics.mean(found.p50) * 1000:.2f} | "
            f"{statistics.mean(found.p99) * 1000:.2f} | **{cpu:,.0f}** ({min(found.cpu_us):,.0f}-"
            f"{max(found.cpu_us):,.0f}) | {ratio} | {same_round} | {verdict} | "
            f"{f'{found.exported:,.0f}' if traced else '-'} | {f'{found.dropped:,.0f}' if traced else '-'} | "
            f"{found.errors} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def chosen_plan() -> perf.Plan:
    """perf.QUICK when BENCH_QUICK is set to anything but "" or "0", as the other benchmarks
    read it (BENCH_QUICK=0 is a full run)."""
    return perf.QUICK if os.environ.get("BENCH_QUICK", "") not in ("", "0") else perf.FULL


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds of each service")
    parser.add_argument("--base-port", type=int, default=27700)
    parser.add_argument(
        "--doc", type=Path, default=None, help="the document to write (default: PERFORMANCE.md)"
    )
    args = parser.parse_args()
    plan = chosen_plan()
    rounds = args.rounds or (1 if plan.quick else 6)
    if not perf.GHZ.exists():
        raise SystemExit(f"missing {perf.GHZ}: bash bench/install-ghz.sh")
    if jaeger_binary() is None:
        raise SystemExit("missing the jaeger binary: make jaeger")
    measured, seconds = run(plan, rounds, args.base_port)
    block = report(measured, plan, rounds, seconds)
    print(block)
    doc = args.doc or (RESULTS / "PERFORMANCE-quick.md" if plan.quick else perf.DOC)
    perf.write_section(doc, BEGIN, END, block)
    perf.say(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
