"""The score cache's benchmark: what a hit saves, what a miss costs, what a slow upstream's callers see.

    make bench-cache                  # or: .venv/bin/python -m bench.cache
    BENCH_QUICK=1 make bench-cache    # a short smoke run (writes bench/results/cache/ only)

Every service is `rerank-service serve --backend upstream` with its defaults, 20 documents a
call; they differ only in the cache's settings:

- no cache: `--cache-memory-mb 0` (no tier at all: the call never touches the cache);
- memory: the in-process tier at its default size (`--cache-memory-mb 64`);
- Redis: `--cache-memory-mb 0 --cache-store redis://…` (only the shared tier, a local
  redis-server started here with no persistence), optional (`--no-redis`).

Workloads, driven by ghz (`--cpus 1`, c=64) as bench/perf.py drives the service:

- 100% hit: one fixed request repeated (the first call of a warm-up run stores its scores);
- 0% hit: every call unique, its query prefixed with the run's tag and ghz's request number
  (a JSON template), so no pair is ever asked twice, warm-up runs included.

1. Fast upstream (nginx, bench/perf.py's static answer): every service runs at once and the
   measured runs (warm-up, then a timed run) alternate between services and workloads,
   round after round, the order reversed every other round, so machine noise falls on all
   alike; each figure is the mean of the rounds. CPU per call: utime + stime of the
   service's process over the measured run, divided by the calls (also ghz's and Redis's).
   The pairs answered from cache are read from the service's /metrics, to show each
   workload hits what it says.
2. A 2 s upstream (bench/slow_upstream.py), a 50%-hit workload: 64 callers in an asyncio
   gRPC client, each alternating the popular request (a hit) and a unique one (a miss),
   half of them starting with each, against the no-cache service on the same workload;
   p50/p99 overall and of each half, requests/s, `x-cache` as the answers' trailers say it.

The generated part of docs/PERFORMANCE.md (between its bench-cache markers) is rewritten;
raw ghz reports land in bench/results/cache/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from bench import perf
from bench.direct_client import percentile
from bench.perf_payloads import request
from bench.workers import children_cpu
from rerank_service.config.settings import Settings
from tests.support.process import ServiceProcess
from tests.support.redis_server import RedisServer, redis_server_binary

RESULTS = perf.ROOT / "bench" / "results" / "cache"
BEGIN, END = "<!-- bench-cache:begin -->", "<!-- bench-cache:end -->"
DOCUMENTS = 20
CONCURRENCY = 64
SLOW_LATENCY = perf.SLOW_LATENCY  # 2 s
SLOW_TIMEOUT = perf.SLOW_TIMEOUT  # 6 s: a call's deadline against the slow upstream
HIT_GOAL = 2.0  # 100% hit: at least this many times the no-cache service's requests/s
MISS_GOAL = 1.1  # 0% hit: at most this many times the no-cache service's CPU per call

OFF, MEMORY, REDIS = "no cache", "memory", "Redis"
HIT, MISS = "100% hit", "0% hit"
WORKLOADS = (HIT, MISS)
# The in-process tier's default size, named on the command line: the tests' harness that starts
# the services (tests/support/process.py) turns the cache off unless a flag says otherwise.
DEFAULT_MEMORY_MB = Settings().cache_memory_mb
FLAGS: dict[str, list[str]] = {  # REDIS's: its URL, at run time
    OFF: ["--cache-memory-mb", "0"],
    MEMORY: ["--cache-memory-mb", str(DEFAULT_MEMORY_MB)],
}
TAG = secrets.token_hex(3)  # this run's prefix of unique queries (a Redis of an earlier run never hits)


@dataclass(frozen=True)
class Plan:
    seconds: float  # measured seconds per fast run
    warmup: float  # warm-up seconds before each fast run
    rounds: int  # interleaved measured runs per fast service and workload
    slow_pairs: int  # per caller and slow run: this many (popular, unique) pairs of calls
    slow_rounds: int  # interleaved measured runs per slow service
    quick: bool


FULL = Plan(seconds=10, warmup=2, rounds=3, slow_pairs=4, slow_rounds=2, quick=False)
QUICK = Plan(seconds=2, warmup=1, rounds=1, slow_pairs=2, slow_rounds=1, quick=True)


@dataclass
class Run:
    """Every measured fast run of one service on one workload."""

    service: str
    workload: str
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # the service's CPU per call, each round
    ghz_us: list[float] = field(default_factory=list)
    redis_us: list[float] = field(default_factory=list)
    calls: int = 0
    errors: int = 0
    hits: float = 0  # pairs answered from cache (the service's /metrics)
    misses: float = 0  # pairs sent upstream through the cache
    store_errors: float = 0  # Redis round trips that failed or timed out
    evictions: float = 0  # memory entries dropped for room

    @property
    def hit_share(self) -> float | None:
        pairs = self.hits + self.misses
        return self.hits / pairs if pairs else None


@dataclass
class SlowRun:
    """Every measured run of one service on the 50%-hit workload against the 2 s upstream."""

    service: str
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"popular": [], "unique": []})
    outcomes: dict[str, int] = field(default_factory=dict)  # x-cache of the answers (or "none")
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    errors: int = 0

    def all_latencies(self) -> list[float]:
        return sorted(self.latencies["popular"] + self.latencies["unique"])


@dataclass
class Results:
    plan: Plan
    fast: list[Run] = field(default_factory=list)
    slow: list[SlowRun] = field(default_factory=list)
    seconds: float = 0.0
    # The gRPC stack alone (bench/perf.py's canned servicer) held to the 100%-hit memory
    # service's requests/s: its CPU per call at that rate.
    canned_at_hit_rate: perf.Point | None = None

    def get(self, service: str, workload: str) -> Run | None:
        return next((r for r in self.fast if (r.service, r.workload) == (service, workload)), None)

    def get_slow(self, service: str) -> SlowRun | None:
        return next((r for r in self.slow if r.service == service), None)


@dataclass(frozen=True)
class Ports:
    base: int

    @property
    def nginx(self) -> int:
        return self.base

    @property
    def slow(self) -> int:
        return self.base + 1

    def service(self, index: int) -> int:
        return self.base + 10 + index

    def metrics(self, index: int) -> int:
        return self.base + 20 + index

    @property
    def canned(self) -> int:
        return self.base + 2


@dataclass
class Target:
    """A running service: its name, gRPC and metrics ports, and process."""

    name: str
    port: int
    metrics_port: int
    process: ServiceProcess

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid


# --- processes -------------------------------------------------------------------------------


@contextlib.contextmanager
def services(
    names: Sequence[str], ports: Ports, upstream_url: str, redis_url: str | None
) -> Iterator[list[Target]]:
    """One service per name, all running at once, each with its /metrics."""
    if REDIS in names and redis_url is None:
        raise ValueError("the Redis service needs a Redis URL")
    flags = {**FLAGS, REDIS: ["--cache-memory-mb", "0", "--cache-store", str(redis_url)]}
    with contextlib.ExitStack() as stack:
        targets = []
        for index, name in enumerate(names):
            extra = [*flags[name], "--metrics-port", str(ports.metrics(index))]
            process = stack.enter_context(
                perf.service_process(ports.service(index), upstream_url, flags=extra)
            )
            targets.append(Target(name, ports.service(index), ports.metrics(index), process))
        for target in targets:
            check_cache(target)
        yield targets


def redis_version() -> str:
    binary = redis_server_binary()
    if binary is None:
        return "no redis-server"
    text = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    return next((part.removeprefix("v=") for part in text.split() if part.startswith("v=")), text.strip())


# --- requests --------------------------------------------------------------------------------


def unique_request(number: int | str, tag: str) -> rerank_pb2.RerankRequest:
    """The fixed request with its query made unique by `tag` and `number`: no pair cached."""
    fixed = request(DOCUMENTS)
    return rerank_pb2.RerankRequest(
        model=fixed.model, query=f"{tag}-{number} {fixed.query}", documents=fixed.documents
    )


def unique_template(tag: str) -> Path:
    """ghz's JSON call data for unique calls: its request number makes each query new."""
    path = RESULTS / f"unique-{tag}.json"
    data = json_format.MessageToDict(unique_request("{{.RequestNumber}}", tag))
    if any("{{" in text for text in data["documents"]):
        raise RuntimeError("a corpus document holds a template action: ghz would run it")
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def fixed_request_file() -> Path:
    """ghz's call data for the 100%-hit workload: the fixed request, serialized."""
    path = RESULTS / f"request-{DOCUMENTS}.bin"
    path.write_bytes(request(DOCUMENTS).SerializeToString())
    return path


def call_cache(port: int, message: rerank_pb2.RerankRequest) -> str | None:
    """One call; what its `x-cache` trailer says (None: no trailer)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        response, call = stub.Rerank.with_call(message, timeout=30)
    if len(response.output.results) != DOCUMENTS:
        raise RuntimeError(f"port {port}: {len(response.output.results)} results, expected {DOCUMENTS}")
    found = dict(call.trailing_metadata() or ()).get("x-cache")
    return str(found) if found is not None else None


def check_cache(target: Target) -> None:
    """Before any load: the service answers, and its cache does what its name says (the
    fixed request twice: stored, then a hit; a unique one: a miss; no cache: no trailer)."""
    first = call_cache(target.port, request(DOCUMENTS))
    again = call_cache(target.port, request(DOCUMENTS))
    unique = call_cache(target.port, unique_request(f"check{target.port}", TAG))
    expected = (None, None, None) if target.name == OFF else ("miss", "hit", "miss")
    if (first, again, unique) != expected:
        raise RuntimeError(
            f"{target.name} on port {target.port}: x-cache {first}, {again}, {unique}, expected {expected}"
        )


# --- measuring -------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ghz(port: int, data: list[str], seconds: float, out: Path) -> dict[str, Any]:
    """One timed ghz run at c=64 with `data` (its call-data flags), as bench/perf.py's ghz runs it."""
    command = [
        str(perf.GHZ),
        "--insecure",
        "--proto",
        perf.PROTO,
        "--import-paths",
        "proto",
        "--call",
        perf.CALL,
        *data,
        "--concurrency",
        str(CONCURRENCY),
        "--connections",
        str(perf.connections(CONCURRENCY)),
        "--cpus",
        perf.GHZ_CPUS,
        "--timeout",
        "20s",
        "--format",
        "json",
        "--output",
        str(out),
        "--duration",
        f"{seconds:g}s",
        "--duration-stop",
        "ignore",
        f"127.0.0.1:{port}",
    ]
    completed = subprocess.run(command, cwd=perf.ROOT, capture_output=True, text=True, check=False)
    if completed.returncode != 0 or not out.exists():
        raise RuntimeError(f"ghz failed ({completed.returncode}): {completed.stderr.strip()}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def cache_counts(metrics_port: int) -> dict[str, float]:
    """The cache's counters on the service's /metrics: pairs "hit" and "miss", "store_errors",
    "evictions" (for room); a counter not there yet is 0."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    counts = dict.fromkeys(("hit", "miss", "store_errors", "evictions"), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rerank_cache_pairs_total" and sample.labels.get("result") in counts:
                counts[sample.labels["result"]] += sample.value
            elif sample.name == "rerank_cache_store_errors_total":
                counts["store_errors"] += sample.value
            elif sample.name == "rerank_cache_evictions_total" and sample.labels.get("reason") == "size":
                counts["evictions"] += sample.value
    return counts


class Workloads:
    """ghz's call data for each workload; every unique run gets a tag of its own."""

    def __init__(self) -> None:
        self._fixed = fixed_request_file()
        self._runs = 0

    def data(self, workload: str) -> list[str]:
        if workload == HIT:
            return ["--binary-file", str(self._fixed)]
        self._runs += 1
        return ["--data-file", str(unique_template(f"{TAG}.{self._runs}"))]


def measure(run: Run, target: Target, workloads: Workloads, plan: Plan, redis_pid: int | None) -> None:
    """A warm-up run, then one measured run of `run`'s workload, added to `run`."""
    tag = f"{run.workload.split('%')[0]}-{target.name.split()[0].lower()}-{len(run.rps)}"
    ghz(target.port, workloads.data(run.workload), plan.warmup, RESULTS / f"{tag}-warmup.json")
    data = workloads.data(run.workload)
    counts, cpu, ghz_cpu = cache_counts(target.metrics_port), perf.cpu_seconds(target.pid), children_cpu()
    redis_cpu = perf.cpu_seconds(redis_pid) if redis_pid else 0.0
    report = ghz(target.port, data, plan.seconds, RESULTS / f"{tag}.json")
    cpu, ghz_cpu = perf.cpu_seconds(target.pid) - cpu, children_cpu() - ghz_cpu
    redis_cpu = perf.cpu_seconds(redis_pid) - redis_cpu if redis_pid else 0.0
    after = cache_counts(target.metrics_port)
    counts = {name: after[name] - before for name, before in counts.items()}
    target.process.lines.clear()  # the access log's lines, kept by ServiceProcess: not needed
    point = perf.from_ghz("cache", DOCUMENTS, CONCURRENCY, run.service, report)
    served = max(point.count + point.errors, 1)
    run.rps.append(point.rps)
    run.p50.append(point.p50)
    run.p99.append(point.p99)
    run.cpu_us.append(cpu / served * 1e6)
    run.ghz_us.append(ghz_cpu / served * 1e6)
    if target.name == REDIS:
        run.redis_us.append(redis_cpu / served * 1e6)
    run.calls += point.count
    run.errors += point.errors
    run.hits += counts["hit"]
    run.misses += counts["miss"]
    run.store_errors += counts["store_errors"]
    run.evictions += counts["evictions"]
    pairs = counts["hit"] + counts["miss"]
    share = f", {counts['hit'] / pairs:.0%} pairs cached" if pairs else ""
    errors = f", {point.errors} ERRORS" if point.errors else ""
    store = f", {counts['store_errors']:.0f} Redis errors" if counts["store_errors"] else ""
    say(
        f"  {run.workload:<8} {run.service:<9} {point.rps:8.1f} req/s  p50 {point.p50 * 1e3:7.2f} ms  "
        f"p99 {point.p99 * 1e3:7.2f} ms  {run.cpu_us[-1]:5.0f} CPU-µs/call{share}{store}{errors}"
    )


def fast_scenario(results: Results, ports: Ports, redis: RedisServer | None) -> None:
    plan = results.plan
    names = [OFF, MEMORY] + ([REDIS] if redis else [])
    url = f"http://127.0.0.1:{ports.nginx}"
    say(
        f"fast upstream (nginx), {DOCUMENTS} documents, c={CONCURRENCY}: {', '.join(names)} x "
        f"{', '.join(WORKLOADS)}, {plan.rounds} interleaved rounds"
    )
    redis_pid = redis.process.pid if redis and redis.process else None
    with (
        perf.nginx({DOCUMENTS: ports.nginx}),
        services(names, ports, url, redis.url if redis else None) as targets,
    ):
        workloads = Workloads()
        order = [(target, workload) for workload in WORKLOADS for target in targets]
        runs = {(t.name, w): Run(t.name, w) for t, w in order}
        results.fast.extend(runs.values())
        for number in range(plan.rounds):
            for target, workload in order if number % 2 == 0 else order[::-1]:
                measure(runs[target.name, workload], target, workloads, plan, redis_pid)
    memory_hit = results.get(MEMORY, HIT)
    if memory_hit is not None:
        results.canned_at_hit_rate = canned_at(mean(memory_hit.rps), ports, plan)


def canned_at(rps: float, ports: Ports, plan: Plan) -> perf.Point:
    """The gRPC stack's CPU per call at `rps`: bench/perf.py's canned servicer (a fixed answer of
    the same size), held there by ghz. grpc.aio costs more a call the fewer calls share each
    wake-up of its poller thread and event loop, so a hit is compared with it at the hit's rate."""
    url = f"http://127.0.0.1:{ports.nginx}"  # not called: canned answers from memory
    with perf.baseline("canned", ports.canned, DOCUMENTS, url) as pid:
        perf.check_answer(ports.canned, DOCUMENTS)
        timing = perf.Plan(
            seconds=plan.seconds,
            warmup=plan.warmup,
            slow_rounds=1,
            memory_first=0,
            memory_total=0,
            profile_seconds=0,
            quick=plan.quick,
        )
        point = perf.measure_grpc(
            "cache", "canned", pid, ports.canned, DOCUMENTS, CONCURRENCY, timing, slow=False, rps=rps
        )
    say(f"  canned at {rps:,.0f} req/s: {point.cpu_us or 0:5.0f} CPU-µs/call")
    return point


# --- the 2 s upstream, half hits -------------------------------------------------------------


async def mixed_load(port: int, pairs: int, tag: str) -> tuple[SlowRun, float]:
    """64 callers, each making `pairs` pairs of calls: the popular request and a unique one,
    half of them starting with each. The measured calls, and the seconds they took."""
    measured = SlowRun("")
    popular = request(DOCUMENTS)
    numbers = iter(range(1 << 30))

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)

        async def call(kind: str) -> None:
            message = popular if kind == "popular" else unique_request(next(numbers), tag)
            started = time.perf_counter()
            try:
                rpc = stub.Rerank(message, timeout=SLOW_TIMEOUT)
                await rpc
                trailing = await rpc.trailing_metadata()
            except grpc.aio.AioRpcError:
                measured.errors += 1
                return
            measured.latencies[kind].append(time.perf_counter() - started)
            outcome = str(dict(trailing or ()).get("x-cache", "none"))
            measured.outcomes[outcome] = measured.outcomes.get(outcome, 0) + 1

        async def caller(number: int) -> None:
            kinds = ("popular", "unique") if number % 2 == 0 else ("unique", "popular")
            for _ in range(pairs):
                for kind in kinds:
                    await call(kind)

        started = time.perf_counter()
        await asyncio.gather(*(caller(number) for number in range(CONCURRENCY)))
        return measured, time.perf_counter() - started


def slow_measure(run: SlowRun, target: Target, plan: Plan) -> None:
    asyncio.run(mixed_load(target.port, 1, f"{TAG}.slow-warmup-{target.port}-{len(run.rps)}"))
    cpu = perf.cpu_seconds(target.pid)
    measured, seconds = asyncio.run(
        mixed_load(target.port, plan.slow_pairs, f"{TAG}.slow-{target.port}-{len(run.rps)}")
    )
    cpu = perf.cpu_seconds(target.pid) - cpu
    target.process.lines.clear()
    calls = sum(len(values) for values in measured.latencies.values())
    for kind, values in measured.latencies.items():
        run.latencies[kind].extend(values)
    for outcome, count in measured.outcomes.items():
        run.outcomes[outcome] = run.outcomes.get(outcome, 0) + count
    run.errors += measured.errors
    run.rps.append(calls / seconds)
    run.cpu_us.append(cpu / max(calls + measured.errors, 1) * 1e6)
    every = measured.all_latencies()
    outcomes = ", ".join(f"{name} {count}" for name, count in sorted(measured.outcomes.items()))
    errors = f", {measured.errors} ERRORS" if measured.errors else ""
    say(
        f"  {run.service:<9} {run.rps[-1]:6.1f} req/s  p50 {percentile(every, 50) * 1e3:7.1f} ms  "
        f"p99 {percentile(every, 99) * 1e3:7.1f} ms  x-cache: {outcomes}{errors}"
    )


def slow_scenario(results: Results, ports: Ports) -> None:
    plan = results.plan
    command = [sys.executable, "-m", "bench.slow_upstream", "--port", str(ports.slow)]
    command += ["--latency", str(SLOW_LATENCY), "--documents", str(DOCUMENTS)]
    url = f"http://127.0.0.1:{ports.slow}"
    say(
        f"slow upstream ({SLOW_LATENCY:g} s), 50% hits, {DOCUMENTS} documents, c={CONCURRENCY}, "
        f"{plan.slow_rounds} interleaved rounds"
    )
    with (
        perf.background(command, ports.slow, "slow upstream"),
        services((OFF, MEMORY), ports, url, None) as targets,
    ):
        runs = {target.name: SlowRun(target.name) for target in targets}
        results.slow.extend(runs.values())
        for number in range(plan.slow_rounds):
            for target in targets if number % 2 == 0 else targets[::-1]:
                slow_measure(runs[target.name], target, plan)


# --- the report ------------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _spread(values: list[float]) -> str:
    return f" ({min(values):,.0f}-{max(values):,.0f})" if len(values) > 1 else ""


def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1e3:.2f}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def goals(results: Results) -> list[str]:
    rows = ["| goal | measured | met | same run |", "| --- | ---: | --- | --- |"]
    off_hit, memory_hit = results.get(OFF, HIT), results.get(MEMORY, HIT)
    if off_hit and memory_hit:
        ratio = mean(memory_hit.rps) / mean(off_hit.rps)
        cpu = mean(memory_hit.cpu_us) / mean(off_hit.cpu_us)
        rows.append(
            f"| 100% hit, {DOCUMENTS} documents, c={CONCURRENCY}: ≥ {HIT_GOAL:g}x the no-cache service's "
            f"requests/s | {ratio:.2f}x | {'met' if ratio >= HIT_GOAL else '**not met**'} | a hit costs "
            f"{mean(memory_hit.cpu_us):,.0f} CPU-µs, the upstream call it saves {mean(off_hit.cpu_us):,.0f} "
            f"({cpu:.2f}x){_stack_at_hit_rate(results)} |"
        )
    off_miss, memory_miss = results.get(OFF, MISS), results.get(MEMORY, MISS)
    if off_miss and memory_miss:
        ratio = mean(memory_miss.cpu_us) / mean(off_miss.cpu_us)
        each = ", ".join(
            f"{on / off:.2f}x" for on, off in zip(memory_miss.cpu_us, off_miss.cpu_us, strict=True)
        )
        rows.append(
            f"| 0% hit: cache on ≤ {MISS_GOAL:g}x the CPU per call of cache off | {ratio:.2f}x | "
            f"{'met' if ratio <= MISS_GOAL else '**not met**'} | each round: {each} |"
        )
    return rows


def _stack_at_hit_rate(results: Results) -> str:
    """A hit's CPU against the gRPC stack's alone at the same rate (goals' context)."""
    canned, memory = results.canned_at_hit_rate, results.get(MEMORY, HIT)
    if canned is None or canned.cpu_us is None or memory is None:
        return ""
    return (
        f"; the gRPC stack alone at the hit's {mean(memory.rps):,.0f} req/s (canned) costs "
        f"{canned.cpu_us:,.0f}, leaving {mean(memory.cpu_us) - canned.cpu_us:,.0f} µs for the service's "
        "own work on a hit"
    )


def fast_table(results: Results) -> list[str]:
    rows = [
        "| workload | service | requests/s | p50 ms | p99 ms | service CPU-µs/call | req/s vs no cache "
        "| CPU vs no cache | ghz CPU-µs/call | Redis CPU-µs/call | pairs from cache | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload in WORKLOADS:
        base = results.get(OFF, workload)
        for service in (OFF, MEMORY, REDIS):
            run = results.get(service, workload)
            if run is None:
                continue
            rps = mean(run.rps) / mean(base.rps) if base else math.nan
            cpu = mean(run.cpu_us) / mean(base.cpu_us) if base else math.nan
            share = "-" if run.hit_share is None else f"{run.hit_share:.1%}"
            if run.store_errors:
                share += f" ({run.store_errors:.0f} Redis errors)"
            name = f"**{service}**" if service != OFF else service
            rows.append(
                f"| {workload} | {name} | {mean(run.rps):,.0f}{_spread(run.rps)} | {_ms(mean(run.p50))} | "
                f"{_ms(mean(run.p99))} | **{mean(run.cpu_us):,.0f}**{_spread(run.cpu_us)} | "
                f"{_ratio(rps) if service != OFF else '-'} | {_ratio(cpu) if service != OFF else '-'} | "
                f"{mean(run.ghz_us):,.0f} | {f'{mean(run.redis_us):,.0f}' if run.redis_us else '-'} | "
                f"{share} | {run.errors} |"
            )
    return rows


def slow_table(results: Results) -> list[str]:
    rows = [
        "| service | requests/s | p50 ms | p99 ms | popular: p50 ms | popular: p99 ms | unique: p50 ms "
        "| unique: p99 ms | x-cache of the answers | service CPU-µs/call | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for service in (OFF, MEMORY):
        run = results.get_slow(service)
        if run is None:
            continue
        every = run.all_latencies()
        popular, unique = sorted(run.latencies["popular"]), sorted(run.latencies["unique"])
        outcomes = ", ".join(f"{name} {count:,}" for name, count in sorted(run.outcomes.items()))
        rows.append(
            f"| {'**' + service + '**' if service != OFF else service} | {mean(run.rps):,.1f} | "
            + " | ".join(_ms(percentile(values, p)) for values in (every, popular, unique) for p in (50, 99))
            + f" | {outcomes} | {mean(run.cpu_us):,.0f} | {run.errors} |"
        )
    return rows


def summary(results: Results) -> list[str]:
    text = []
    off, memory, redis = (results.get(name, HIT) for name in (OFF, MEMORY, REDIS))
    if off and memory:
        text.append(
            f"**100% hit.** A call answered whole from the in-process tier costs {mean(memory.cpu_us):,.0f} "
            f"CPU-µs against {mean(off.cpu_us):,.0f} for the same call sent upstream "
            f"({mean(off.cpu_us) - mean(memory.cpu_us):,.0f} µs saved: the upstream request's JSON, its "
            f"HTTP round trip, the answer's checks), and the service serves "
            f"{mean(memory.rps) / mean(off.rps):.2f}x the requests/s. Requests/s here are shared-core "
            "figures: ghz and the upstream run on the same cores as the service, so the service's CPU per "
            "call is the figure that carries over (the calls a core serves): twice the requests/s takes a "
            f"hit of at most half the upstream call's CPU, {mean(off.cpu_us) / HIT_GOAL:,.0f} µs, everything "
            "around the cache (gRPC, the edge, the engine, the access log) included."
        )
        if redis:
            text.append(
                f"From the Redis tier alone (one MGET of the {DOCUMENTS} pairs a call) a hit costs the "
                f"service {mean(redis.cpu_us):,.0f} CPU-µs ({mean(redis.cpu_us) / mean(off.cpu_us):.2f}x the "
                f"upstream call), and Redis {mean(redis.redis_us):,.0f} µs."
            )
    off_miss, memory_miss, redis_miss = (results.get(name, MISS) for name in (OFF, MEMORY, REDIS))
    if off_miss and memory_miss:
        evictions = (
            f"; the in-process tier was full and dropped {memory_miss.evictions:,.0f} entries for room "
            "during the measured runs"
            if memory_miss.evictions
            else ""
        )
        line = (
            f"**0% hit.** Every pair looked up, missed, sent upstream and stored: "
            f"{mean(memory_miss.cpu_us) / mean(off_miss.cpu_us):.2f}x the CPU per call of the service "
            f"without a cache ({mean(memory_miss.cpu_us) - mean(off_miss.cpu_us):+,.0f} µs a call of "
            f"{DOCUMENTS} pairs){evictions}. The goal, {MISS_GOAL:g}x, allows "
            f"{mean(off_miss.cpu_us) * (MISS_GOAL - 1):,.0f} µs a call, "
            f"{mean(off_miss.cpu_us) * (MISS_GOAL - 1) / DOCUMENTS:,.1f} µs a pair."
        )
        if redis_miss:
            line += (
                " With Redis instead (an MGET that finds nothing, then one script run that SETs the "
                f"{DOCUMENTS} pairs): "
                f"{mean(redis_miss.cpu_us) / mean(off_miss.cpu_us):.2f}x."
            )
        text.append(line)
    off_slow, memory_slow = results.get_slow(OFF), results.get_slow(MEMORY)
    if off_slow and memory_slow:
        every = memory_slow.all_latencies()
        hits = sorted(memory_slow.latencies["popular"])
        text.append(
            f"**{SLOW_LATENCY:g} s upstream, half hits.** The hits answer in {_ms(percentile(hits, 50))} "
            "ms at p50, so each caller spends its time on the misses alone and the service answers "
            f"{mean(memory_slow.rps) / mean(off_slow.rps):.2f}x the requests/s of the service without a "
            f"cache (whose every call waits {SLOW_LATENCY:g} s). The p50 of all calls falls on the edge "
            f"between the two halves ({_ms(percentile(every, 50))} ms here), so the table also gives each "
            "half's."
        )
    return text


def report(results: Results) -> str:
    plan = results.plan
    redis = results.get(REDIS, HIT) is not None
    lines = [
        BEGIN,
        "<!-- Generated by `make bench-cache` (bench/cache.py): edits between the markers are lost. -->",
        "",
        "## Score cache",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {results.seconds / 60:.1f} minutes"
        + (" — **BENCH_QUICK=1 smoke run, not a record**" if plan.quick else "")
        + f". Machine: {perf.machine()}"
        + (f", Redis {redis_version()}" if redis else "")
        + ".",
        "",
        f"`rerank-service serve --backend upstream` with its defaults, {DOCUMENTS} documents a call, "
        f"c={CONCURRENCY} (docs/CACHE.md says what the cache does). Services: **no cache** "
        f"(`--cache-memory-mb 0`), **memory** (the in-process tier at its default size, "
        f"`--cache-memory-mb {DEFAULT_MEMORY_MB}`)"
        + (
            ", **Redis** (`--cache-memory-mb 0 --cache-store redis://…`: the shared tier alone, a local "
            "redis-server without persistence)"
            if redis
            else ""
        )
        + ". Workloads: **100% hit**, one fixed request repeated; **0% hit**, every call's query made "
        "unique (ghz's request number in a JSON template, a tag per run), so no pair is asked twice. "
        "`pairs from cache` is what the service's own metrics counted (`rerank_cache_pairs`).",
        "",
    ]
    if len(rows := goals(results)) > 2:
        lines += ["### Goals", "", *rows, ""]
    if results.fast:
        lines += [
            f"### Fast upstream, {DOCUMENTS} documents, c={CONCURRENCY}",
            "",
            f"nginx answering bench/perf.py's static answer; every service running at once, their measured "
            f"runs alternating (the order reversed every other round): per run {plan.warmup:g} s warm-up, "
            f"{plan.seconds:g} s measured by ghz (`--cpus {perf.GHZ_CPUS}`); the mean of {plan.rounds} "
            "rounds (range in brackets). CPU per call: utime + stime over the measured run divided by the "
            "calls, of the service's process, of ghz and of redis-server.",
            "",
            *fast_table(results),
            "",
        ]
    if results.slow:
        lines += [
            f"### A {SLOW_LATENCY:g} s upstream, half the calls hits",
            "",
            f"bench/slow_upstream.py answering after {SLOW_LATENCY:g} s; {CONCURRENCY} callers (an asyncio "
            f"gRPC client, one HTTP/2 connection), each making {plan.slow_pairs} pairs of calls per run: the "
            "popular request (cached once, a hit) and a unique one (a miss), half the callers starting with "
            f"each; a warm-up pair first; {plan.slow_rounds} measured runs per service, alternating. The no-"
            "cache service gets the same calls. Percentiles as ghz computes them; `popular` and `unique`: "
            "each half's.",
            "",
            *slow_table(results),
            "",
        ]
    for paragraph in summary(results):
        lines += [paragraph, ""]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=27700,
        help="first of the loopback ports used (below the ephemeral range)",
    )
    parser.add_argument("--doc", type=Path, default=None, help="the document to write the tables into")
    parser.add_argument("--only", choices=("fast", "slow"), action="append", help="run only these scenarios")
    parser.add_argument("--no-redis", action="store_true", help="leave the Redis tier out (no redis-server)")
    args = parser.parse_args()
    plan = QUICK if os.environ.get("BENCH_QUICK", "") not in ("", "0") else FULL
    doc = args.doc or (RESULTS / "PERFORMANCE-quick.md" if plan.quick else perf.DOC)
    if not perf.GHZ.exists():
        raise SystemExit(
            f"ghz is missing at {perf.GHZ}: run bash bench/install-ghz.sh (make bench-cache does)"
        )
    if not args.no_redis and redis_server_binary() is None:
        raise SystemExit("redis-server is missing: run `make redis`, or pass --no-redis")
    RESULTS.mkdir(parents=True, exist_ok=True)
    ports = Ports(args.base_port)
    results = Results(plan)
    started = time.monotonic()
    scenarios = args.only or ["fast", "slow"]
    if "fast" in scenarios:
        with RedisServer() if not args.no_redis else contextlib.nullcontext() as redis:
            fast_scenario(results, ports, redis)
    if "slow" in scenarios:
        slow_scenario(results, ports)
    results.seconds = time.monotonic() - started
    block = report(results)
    perf.write_section(doc, BEGIN, END, block)
    raw = {"fast": [asdict(run) for run in results.fast], "slow": [asdict(run) for run in results.slow]}
    (RESULTS / "runs.json").write_text(json.dumps(raw, indent=1))
    print("\n" + block)
    say(f"wrote {doc.relative_to(perf.ROOT) if doc.is_relative_to(perf.ROOT) else doc}")


if __name__ == "__main__":
    main()
