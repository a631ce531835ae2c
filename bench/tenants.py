"""What tenants cost: CPU per call with 100 callers and their limits, against no callers,
and the same limits held in Redis.

    make bench-tenants                  # or: .venv/bin/python -m bench.tenants [--rounds 4]
    BENCH_QUICK=1 make bench-tenants    # a short smoke run (writes bench/results/tenants/ only)

Three `rerank-service serve --backend upstream` processes in front of bench/perf.py's nginx
fast upstream (a static answer), score cache off (`--cache-memory-mb 0`: every call goes
upstream), 20 documents a call, ghz (`--cpus 1`) at c=64, every call with one caller's key:

- no callers: no `callers:` section (every call is `anonymous`);
- 100 callers: a `callers:` section of 100 callers (keys by `key_sha256`), each with
  requests, documents and tokens per minute and a concurrent limit, none reached: every
  call is identified, checked against its 4 limits, settled and metered, buckets in the
  process;
- 100 callers, Redis: the same with `--limits-store` on a local redis-server (no
  persistence).

The measured runs (a warm-up, then a timed run) alternate between the services round after
round, the order reversed every other round, so machine noise falls on all alike; each
figure is the mean of the rounds. CPU per call: utime + stime of the service's process over
the timed run, divided by the calls; Redis's own CPU and its script calls (INFO
commandstats) per call beside it.

The generated part of docs/TENANTS.md (between its bench-tenants markers) is rewritten; raw
ghz reports land in bench/results/tenants/. Exits 1 when 100 callers cost more than 1.1x
the CPU per call of none (without Redis).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from rerank.v1 import rerank_pb2_grpc

from bench import perf
from bench.perf_payloads import request
from tests.support.process import ServiceProcess
from tests.support.redis_server import RedisServer, redis_server_binary
from tests.support.scrape import scrape, value

RESULTS = perf.ROOT / "bench" / "results" / "tenants"
DOC = perf.ROOT / "docs" / "TENANTS.md"
BEGIN, END = "<!-- bench-tenants:begin -->", "<!-- bench-tenants:end -->"
DOCUMENTS = 20
CONCURRENCY = 64
CALLERS = 100
GOAL = 1.1  # 100 callers with limits: at most this many times the CPU per call of none
NONE, CALLERS_LOCAL, CALLERS_REDIS = "no callers", "100 callers, limits", "100 callers, limits, Redis"
KEY = "bench-caller-key-50"  # the key of caller 50, which the load sends


def callers_file(directory: Path) -> Path:
    """100 callers, each with every kind of limit, none of which the load reaches."""
    callers = [
        {
            "name": f"team-{index:03d}",
            "credentials": [{"key_sha256": hashlib.sha256(f"bench-caller-key-{index}".encode()).hexdigest()}],
            "limits": {
                "requests_per_minute": 100_000_000,
                "documents_per_minute": 1_000_000_000,
                "tokens_per_minute": 1_000_000_000_000,
                "concurrent": 10_000,
            },
        }
        for index in range(CALLERS)
    ]
    path = directory / "callers.yaml"
    path.write_text(yaml.safe_dump({"callers": callers}, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Round:
    rps: float
    cpu_us: float
    p50_ms: float
    errors: int
    redis_cpu_us: float = 0.0
    redis_calls: float = 0.0  # script runs in Redis per call
    round_trips: float = 0.0  # round trips to Redis per call


@dataclass
class Service:
    name: str
    process: ServiceProcess
    port: int
    metrics_port: int
    rounds: list[Round] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid

    def mean(self, attribute: str) -> float:
        return float(statistics.mean(float(getattr(item, attribute)) for item in self.rounds))


def redis_script_calls(redis: RedisServer) -> float:
    """EVALSHA and EVAL calls Redis has run so far."""
    with redis.client() as client:
        stats = client.info("commandstats")
    return float(sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval")))


def round_trips(service: Service) -> float:
    """Round trips the service has made to the limits store so far."""
    return float(value(scrape(service.metrics_port), "rerank_limits_store_round_trips_total"))


def measure(service: Service, plan: perf.Plan, tag: str, redis: RedisServer | None) -> Round:
    out = RESULTS / f"{tag}-{service.name.replace(' ', '-').replace(',', '')}"
    metadata = {"authorization": f"Bearer {KEY}"}
    perf.ghz(
        service.port,
        DOCUMENTS,
        CONCURRENCY,
        out.with_suffix(".warmup.json"),
        seconds=plan.warmup,
        metadata=metadata,
    )
    trips_before = round_trips(service)
    cpu_before = perf.cpu_seconds(service.pid)
    redis_before = (
        (perf.cpu_seconds(redis.process.pid), redis_script_calls(redis)) if redis and redis.process else None
    )
    report = perf.ghz(
        service.port,
        DOCUMENTS,
        CONCURRENCY,
        out.with_suffix(".json"),
        seconds=plan.seconds,
        metadata=metadata,
    )
    used = perf.cpu_seconds(service.pid) - cpu_before
    point = perf.from_ghz("tenants", DOCUMENTS, CONCURRENCY, service.name, report)
    calls = max(point.count + point.errors, 1)
    measured = Round(point.rps, used / calls * 1e6, point.p50 * 1000, point.errors)
    measured.round_trips = (round_trips(service) - trips_before) / calls
    if redis_before is not None and redis is not None and redis.process is not None:
        measured.redis_cpu_us = (perf.cpu_seconds(redis.process.pid) - redis_before[0]) / calls * 1e6
        measured.redis_calls = (redis_script_calls(redis) - redis_before[1]) / calls
    return measured


@contextlib.contextmanager
def services(
    directory: Path, upstream: str, first_port: int, redis: RedisServer | None
) -> Iterator[list[Service]]:
    config = callers_file(directory)
    common = ["--cache-memory-mb", "0"]
    plans = [(NONE, common), (CALLERS_LOCAL, [*common, "--config", str(config)])]
    if redis is not None:
        plans.append((CALLERS_REDIS, [*common, "--config", str(config), "--limits-store", redis.url]))
    with contextlib.ExitStack() as stack:
        started = []
        for offset, (name, flags) in enumerate(plans):
            port, metrics_port = first_port + offset, first_port + 10 + offset
            flags = [*flags, "--metrics-port", str(metrics_port)]
            process = stack.enter_context(perf.service_process(port, upstream, flags=flags))
            started.append(Service(name, process, port, metrics_port))
        yield started


def check(service: Service) -> None:
    """One call with the key before any load: answered, by the caller the key names."""
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        response = rerank_pb2_grpc.RerankServiceStub(channel).Rerank(
            request(DOCUMENTS), metadata=(("authorization", f"Bearer {KEY}"),), timeout=30
        )
    if len(response.output.results) != DOCUMENTS:
        raise RuntimeError(f"{service.name}: {len(response.output.results)} results, expected {DOCUMENTS}")


def table(results: list[Service], rounds: int, seconds: float) -> str:
    base = next(service for service in results if service.name == NONE).mean("cpu_us")
    lines = [
        BEGIN,
        f"<!-- generated by `make bench-tenants` (bench/tenants.py); {perf.machine()}; "
        f"{rounds} alternating rounds of {seconds:g} s each -->",
        "",
        f"{DOCUMENTS} documents a call, c={CONCURRENCY} (ghz), nginx fast upstream, score cache off; "
        f"CPU per call of the service's process; the mean of {rounds} alternating rounds.",
        "",
        "| service | requests/s | p50 | CPU per call | vs no callers | each round's CPU per call "
        "| Redis round trips per call | Redis CPU per call |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for service in results:
        each = ", ".join(f"{item.cpu_us:.0f}" for item in service.rounds)
        redis = service.name == CALLERS_REDIS
        lines.append(
            f"| {service.name} | {service.mean('rps'):.0f} | {service.mean('p50_ms'):.1f} ms "
            f"| {service.mean('cpu_us'):.0f} µs | {service.mean('cpu_us') / base:.3f}x | {each} "
            + (
                f"| {service.mean('round_trips'):.2f} ({service.mean('redis_calls'):.2f} script runs) "
                f"| {service.mean('redis_cpu_us'):.0f} µs |"
                if redis
                else "| - | - |"
            )
        )
    errors = sum(item.errors for service in results for item in service.rounds)
    lines += ["", f"Calls that failed over all runs: {errors}.", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds of each service")
    parser.add_argument("--base-port", type=int, default=27700)
    parser.add_argument("--no-redis", action="store_true", help="leave the Redis service out")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    plan = perf.QUICK if os.environ.get("BENCH_QUICK", "") not in ("", "0") else perf.FULL
    rounds = args.rounds or (2 if plan.quick else 4)
    if not perf.GHZ.exists():
        raise SystemExit(f"ghz is missing at {perf.GHZ}: run bash bench/install-ghz.sh")
    use_redis = not args.no_redis
    if use_redis and redis_server_binary() is None:
        raise SystemExit("redis-server is missing: run `make redis` (or pass --no-redis)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    first = args.base_port
    with contextlib.ExitStack() as stack:
        stack.enter_context(perf.nginx({DOCUMENTS: first}))
        redis = stack.enter_context(RedisServer()) if use_redis else None
        started = stack.enter_context(services(RESULTS, f"http://127.0.0.1:{first}", first + 1, redis))
        for service in started:
            check(service)
        for number in range(rounds):
            order = started if number % 2 == 0 else list(reversed(started))
            for service in order:
                measured = measure(
                    service, plan, f"round{number}", redis if service.name == CALLERS_REDIS else None
                )
                service.rounds.append(measured)
                perf.say(
                    f"round {number + 1}: {service.name}: {measured.rps:.0f}/s, {measured.cpu_us:.0f} µs/call"
                )
    block = table(started, rounds, plan.seconds)
    print(block)
    ratio = started[1].mean("cpu_us") / started[0].mean("cpu_us")
    if not plan.quick and not args.no_write:
        perf.write_section(DOC, BEGIN, END, block)
        perf.say(f"wrote {DOC.relative_to(perf.ROOT)}")
    if ratio > GOAL:
        print(
            f"100 callers with limits cost {ratio:.3f}x the CPU per call of none (goal: <= {GOAL}x)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    started_at = time.monotonic()
    code = main()
    perf.say(f"done in {time.monotonic() - started_at:.0f} s")
    raise SystemExit(code)
