"""Routing under hostile callers and failing upstreams: fairness, failover, a down upstream.

    make bench-routes          # or: .venv/bin/python -m bench.routes [--seconds 10] [--no-write]

Three measurements against real `rerank-service serve --config FILE` processes whose
`models:` section routes `qwen3-rerank` over fake upstreams
(rerank_service/testing/fake_upstream.py, in this process), each answering after 50 ms:

1. Fairness: one deployment. A victim caller keeps 4 ordinary calls in flight while an
   attacker, on its own connection, sends requests that make the upstream fail (their
   query carries a poison marker) for `--seconds`: no attacker (the baseline), poison
   answered 500, answered 200 with a body that is not JSON, answered 503 (retried), and
   bursts of poison every cool-down. A fresh server for each attack, so no attack
   inherits another's health state, and its peak RSS (VmHWM) is its own.
2. Failover: a primary (priority 0) and a fallback (priority 1); 100 calls a second, an
   open loop, for `--seconds`; the primary stops listening 30% of the way (3 s of 10). Which calls tried the
   primary before the fallback answered is read from the server's `fallback` log lines.
3. Down: the only deployment stops listening; once it is down, 50 calls 50 ms apart
   (across its cool-down, so the probes are among them).

Prints the tables and rewrites them in docs/RELIABILITY.md between the routes-* markers;
exits 1 if a bound that document states did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from bench.reliability import counts, machine, publish, seconds
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.support.fault_scenarios import error_reason, error_retry_delay, memory_bytes, rerank_request
from tests.support.process import ServiceProcess

KEY = "bench-upstream-key"
KEY_ENV = "BENCH_ROUTES_UPSTREAM_KEY"
MODEL = "qwen3-rerank"
LATENCY = 0.05  # every fake upstream's, seconds
DEADLINE = 5.0  # every call's
POISON = "poison-7f3a"  # in a query: the fake answers with the attack's fault
VICTIMS = 4  # the victim's calls in flight
ATTACKERS = 8  # the attacker's calls in flight (as fast as the answers come)
COOLDOWN = 1.0  # breaker_cooldown of the fairness and down deployments
# Poison calls at once, every COOLDOWN, in the timed attack: twice the failures in a row
# (upstream_breaker_failures, 5 by default) that made the old global breaker open.
BURST = 10
FAILOVER_RATE = 100.0  # calls a second
FAILOVER_KILL_AT = 3.0  # seconds into a 10 s run the primary stops listening
FAILOVER_COOLDOWN = 5.0  # the primary's breaker_cooldown (the default, written out)
DOWN_CALLS, DOWN_SPACING = 50, 0.05
# The bounds docs/RELIABILITY.md states.
MIN_VICTIM_SUCCESS = 0.99
MAX_P50_RATIO = 2.0
MAX_DOWN_SECONDS = 0.05
MIB = 1024 * 1024


@dataclass(frozen=True)
class Answer:
    """One call as its caller saw it."""

    outcome: str  # "OK", or the code and ErrorInfo reason
    seconds: float
    started: float  # monotonic
    deployment: str | None = None  # x-deployment
    upstream_id: str | None = None  # x-request-id: the answering upstream's request id
    retry_delay: float | None = None
    upstream_ms: float = 0.0  # x-upstream-time: the call's time on the wire to upstreams


async def rerank(
    stub: rerank_pb2_grpc.RerankServiceAsyncStub,
    request: rerank_pb2.RerankRequest,
    sent: tuple[tuple[str, str], ...] = (),
) -> Answer:
    started = time.monotonic()
    call = stub.Rerank(request, timeout=DEADLINE, metadata=sent)
    try:
        await call
    except grpc.aio.AioRpcError as error:
        taken = time.monotonic() - started
        reason = error_reason(error)
        metadata = dict(error.trailing_metadata() or ())
        return Answer(
            error.code().name + (f" {reason}" if reason else ""),
            taken,
            started,
            _text(metadata.get("x-deployment")),
            retry_delay=error_retry_delay(error),
            upstream_ms=float(_text(metadata.get("x-upstream-time")) or 0),
        )
    taken = time.monotonic() - started
    metadata = dict(await call.trailing_metadata() or ())
    return Answer(
        "OK", taken, started, _text(metadata.get("x-deployment")), _text(metadata.get("x-request-id"))
    )


def _text(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def tally(answers: Sequence[Answer]) -> str:
    """ "N: 3 OK, 1 UNAVAILABLE ..." ("-" for none)."""
    return f"{len(answers)}: {counts(Counter(answer.outcome for answer in answers))}" if answers else "-"


def shares(counter: Counter[str]) -> str:
    """ "healthy 60%, ejected 40%"."""
    total = sum(counter.values())
    return ", ".join(f"{name} {count / total:.0%}" for name, count in counter.most_common()) or "-"


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (`share` in (0, 1]); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def ms(value: float) -> str:
    return f"{value * 1000:.0f} ms"


def deployment(upstream: FakeUpstream, name: str, priority: int = 0, **overrides: Any) -> dict[str, Any]:
    return {
        "format": "dashscope",
        "url": upstream.url,
        "name": name,
        "priority": priority,
        "api_key_env": KEY_ENV,
        **overrides,
    }


def serve(
    directory: Path,
    deployments: list[dict[str, Any]],
    *flags: str,
    callers: list[dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
) -> ServiceProcess:
    """`rerank-service serve --config FILE`, FILE one route over `deployments` (and
    `callers`, with their keys in `env`); enter it to start."""
    config = directory / f"routes-{len(list(directory.iterdir()))}.yaml"
    routes: dict[str, Any] = {"models": [{"name": MODEL, "deployments": deployments}]}
    if callers:
        routes["callers"] = callers
    config.write_text(yaml.safe_dump(routes, sort_keys=False), encoding="utf-8")
    return ServiceProcess(["--config", str(config), *flags], env={KEY_ENV: KEY, **(env or {})})


def pid_of(service: ServiceProcess) -> int:
    assert service.process is not None
    return service.process.pid


# --- 1. fairness: a victim and an attacker on one deployment -------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    what: str  # in words, for the table
    fault: Fault | None  # what the upstream answers poison with; None: no attacker
    timed: bool = False  # bursts every cool-down instead of a closed loop


ATTACKS = (
    Attack("idle", "no attacker (the baseline)", None),
    Attack("poison → 500", f"{ATTACKERS} calls in flight, each answered 500", Fault(status=500)),
    Attack(
        "poison → garbage",
        f"{ATTACKERS} calls in flight, each answered 200 `not json`",
        Fault(body=b"not json"),
    ),
    Attack(
        "poison → 503",
        f"{ATTACKERS} calls in flight, each answered 503 (retried)",
        Fault(status=503),
    ),
    Attack(
        "timed to the cool-down",
        f"{BURST} calls at once every {COOLDOWN:g} s (the cool-down), each answered 500",
        Fault(status=500),
        timed=True,
    ),
)


@dataclass
class Fairness:
    attack: Attack
    victim: list[Answer] = field(default_factory=list)
    attacker: list[Answer] = field(default_factory=list)
    states: Counter[str] = field(default_factory=Counter)  # the deployment's, sampled by ListModels
    peak_rss: int = 0

    @property
    def victim_ok(self) -> list[float]:
        return [answer.seconds for answer in self.victim if answer.outcome == "OK"]

    @property
    def success(self) -> float:
        return len(self.victim_ok) / len(self.victim) if self.victim else 0.0

    @property
    def p50(self) -> float:
        return percentile([answer.seconds for answer in self.victim], 0.5)

    @property
    def p99(self) -> float:
        return percentile([answer.seconds for answer in self.victim], 0.99)


async def closed_loop(
    stub: rerank_pb2_grpc.RerankServiceAsyncStub,
    request: rerank_pb2.RerankRequest,
    until: float,
    into: list[Answer],
    sent: tuple[tuple[str, str], ...] = (),
) -> None:
    while time.monotonic() < until:
        into.append(await rerank(stub, request, sent))


async def bursts(
    stub: rerank_pb2_grpc.RerankServiceAsyncStub,
    request: rerank_pb2.RerankRequest,
    until: float,
    into: list[Answer],
) -> None:
    while (began := time.monotonic()) < until:
        into += await asyncio.gather(*(rerank(stub, request) for _ in range(BURST)))
        await asyncio.sleep(max(0.0, began + COOLDOWN - time.monotonic()))


async def watch_states(
    stub: rerank_pb2_grpc.RerankServiceAsyncStub, until: float, into: Counter[str]
) -> None:
    """Sample the deployments' states (ListModels) every 0.1 s."""
    while time.monotonic() < until:
        try:
            listed = await stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=DEADLINE)
        except grpc.aio.AioRpcError as error:
            into[f"ListModels {error.code().name}"] += 1
        else:
            for model in listed.models:
                for member in model.deployments:
                    name = rerank_pb2.DeploymentState.Name(member.state)
                    into[name.removeprefix("DEPLOYMENT_STATE_").lower()] += 1
        await asyncio.sleep(0.1)


async def drive_fairness(target: str, attack: Attack, duration: float) -> Fairness:
    result = Fairness(attack)
    poison = rerank_request(query=f"red apple {POISON}")
    # Two callers, two connections.
    async with (
        grpc.aio.insecure_channel(target) as victim_channel,
        grpc.aio.insecure_channel(target) as attacker_channel,
    ):
        victim = rerank_pb2_grpc.RerankServiceStub(victim_channel)
        attacker = rerank_pb2_grpc.RerankServiceStub(attacker_channel)
        for stub in (victim, attacker):  # warm up both hops
            for _ in range(3):
                await rerank(stub, rerank_request())
        until = time.monotonic() + duration
        tasks = [closed_loop(victim, rerank_request(), until, result.victim) for _ in range(VICTIMS)]
        tasks.append(watch_states(victim, until, result.states))
        if attack.timed:
            tasks.append(bursts(attacker, poison, until, result.attacker))
        elif attack.fault is not None:
            tasks += [closed_loop(attacker, poison, until, result.attacker) for _ in range(ATTACKERS)]
        await asyncio.gather(*tasks)
    return result


def fairness(directory: Path, duration: float) -> tuple[str, list[str]]:
    results: list[Fairness] = []
    for attack in ATTACKS:
        with FakeUpstream(api_key=KEY, models=(MODEL,), latency=LATENCY, record=False) as upstream:
            if attack.fault is not None:
                upstream.poison(POISON, attack.fault)
            with serve(directory, [deployment(upstream, "only", breaker_cooldown=COOLDOWN)]) as service:
                result = asyncio.run(drive_fairness(service.target, attack, duration))
                result.peak_rss = memory_bytes(pid_of(service), "VmHWM")
        results.append(result)
        print(
            f"  {attack.name}: victim {tally(result.victim)}, p50 {ms(result.p50)}, p99 {ms(result.p99)}; "
            f"attacker {tally(result.attacker)}",
            flush=True,
        )
    idle = results[0].p50
    rows = [
        "| attack | the attacker | its calls: what it got | the deployment (samples) | victim calls "
        "| victim OK | victim p50 / p99 | p50 vs idle | server peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    failures = []
    for result in results:
        ratio = result.p50 / idle if idle else 0.0
        attack = result.attack
        rows.append(
            f"| {attack.name} | {attack.what} | {tally(result.attacker)} | {shares(result.states)} "
            f"| {len(result.victim)} "
            f"| {result.success:.2%} | {ms(result.p50)} / {ms(result.p99)} | {ratio:.2f}x "
            f"| {result.peak_rss / MIB:.1f} MiB |"
        )
        if result.success < MIN_VICTIM_SUCCESS:
            failures.append(f"fairness, {result.attack.name}: the victim got {tally(result.victim)}")
        if ratio > MAX_P50_RATIO:
            failures.append(f"fairness, {result.attack.name}: victim p50 {ratio:.2f}x idle's")
    return "\n".join(rows), failures


# --- 1b. fairness between callers: one caller floods the admission slots -------------

FLOOD_SLOTS = (
    16  # --max-concurrent-requests of the flood runs: the flood's share is 8, as the poison attacker's 8
)
FLOODERS = 4 * FLOOD_SLOTS  # the flooding caller's calls in flight: four times every slot
VICTIM_KEY, FLOOD_KEY = "bench-victim-key", "bench-flood-key"
CALLER_KEYS = {"BENCH_VICTIM_KEY": VICTIM_KEY, "BENCH_FLOOD_KEY": FLOOD_KEY}
FLOOD_CALLERS = [
    {"name": "victim", "credentials": [{"key_env": "BENCH_VICTIM_KEY"}]},
    {"name": "flood", "credentials": [{"key_env": "BENCH_FLOOD_KEY"}]},
]


@dataclass(frozen=True)
class Flood:
    name: str
    what: str
    share: float | None  # --caller-max-share; None: no flood
    floods: bool = True


FLOODS = (
    Flood("idle", "no flood (the baseline)", 0.5, floods=False),
    Flood("flood, no fair share", f"{FLOODERS} calls in flight, --caller-max-share 1", 1.0),
    Flood("flood, fair share", f"{FLOODERS} calls in flight, --caller-max-share 0.5 (the default)", 0.5),
)


async def _flood(target: str, until: float) -> list[Answer]:
    """The flooding caller's closed loops, until `until` (monotonic)."""
    answers: list[Answer] = []
    key = (("authorization", f"Bearer {FLOOD_KEY}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        await asyncio.gather(
            *(closed_loop(stub, rerank_request(), until, answers, key) for _ in range(FLOODERS))
        )
    return answers


def _flood_process(target: str, until: float, into: Any) -> None:
    into.send(asyncio.run(_flood(target, until)))


async def drive_flood(target: str, flood: Flood, duration: float) -> Fairness:
    """The victim here; the flood in a process of its own, so the victim's own client is
    not slowed by the flood's (only the server is shared)."""
    result = Fairness(Attack(flood.name, flood.what, None))
    victim_key = (("authorization", f"Bearer {VICTIM_KEY}"),)
    async with grpc.aio.insecure_channel(target) as victim_channel:
        victim = rerank_pb2_grpc.RerankServiceStub(victim_channel)
        for _ in range(3):
            await rerank(victim, rerank_request(), victim_key)
        until = time.monotonic() + duration
        flooder = None
        if flood.floods:
            context = multiprocessing.get_context("spawn")
            receive, send = context.Pipe(duplex=False)
            flooder = context.Process(target=_flood_process, args=(target, until, send))
            flooder.start()
        await asyncio.gather(
            *(closed_loop(victim, rerank_request(), until, result.victim, victim_key) for _ in range(VICTIMS))
        )
        if flooder is not None:
            result.attacker += await asyncio.to_thread(receive.recv)
            flooder.join()
    return result


def flood_fairness(directory: Path, duration: float) -> tuple[str, list[str]]:
    """A caller that floods the admission slots beside a polite one: the fair share keeps
    the polite one served (docs/TENANTS.md)."""
    results: list[Fairness] = []
    for flood in FLOODS:
        with FakeUpstream(api_key=KEY, models=(MODEL,), latency=LATENCY, record=False) as upstream:
            flags = [
                "--max-concurrent-requests", str(FLOOD_SLOTS),
                "--max-open-calls", str(8 * FLOOD_SLOTS),
                "--caller-max-share", f"{flood.share:g}",
                "--cache-memory-mb", "0",
            ]  # fmt: skip
            with serve(
                directory, [deployment(upstream, "only")], *flags, callers=FLOOD_CALLERS, env=CALLER_KEYS
            ) as service:
                result = asyncio.run(drive_flood(service.target, flood, duration))
                result.peak_rss = memory_bytes(pid_of(service), "VmHWM")
        results.append(result)
        print(
            f"  {flood.name}: victim {tally(result.victim)}, p50 {ms(result.p50)}, p99 {ms(result.p99)}; "
            f"flood {tally(result.attacker)}",
            flush=True,
        )
    idle = results[0].p50
    rows = [
        "| run | the flooding caller | its calls: what it got | victim calls | victim OK "
        "| victim p50 / p99 | p50 vs idle | server peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    failures = []
    for flood, result in zip(FLOODS, results, strict=True):
        ratio = result.p50 / idle if idle else 0.0
        rows.append(
            f"| {flood.name} | {flood.what} | {tally(result.attacker)} | {len(result.victim)} "
            f"| {result.success:.2%} | {ms(result.p50)} / {ms(result.p99)} | {ratio:.2f}x "
            f"| {result.peak_rss / MIB:.1f} MiB |"
        )
        if flood.share is not None and flood.share < 1:
            if result.success < MIN_VICTIM_SUCCESS:
                failures.append(f"{flood.name}: the victim got {tally(result.victim)}")
            if ratio > MAX_P50_RATIO:
                failures.append(f"{flood.name}: victim p50 {ratio:.2f}x idle's")
    return "\n".join(rows), failures


# --- 2. failover: the primary stops listening mid-run ---------------------------------


async def drive_failover(
    target: str, primary: FakeUpstream, rate: float, duration: float, kill_at: float
) -> tuple[list[Answer], float, float]:
    """Every call's answer; when the kill began and when the primary stopped listening
    (both monotonic). `go_down` waits for the fake's accept loop, so it runs in a thread."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        for _ in range(3):
            await rerank(stub, rerank_request())
        calls: list[asyncio.Task[Answer]] = []
        kill: asyncio.Task[None] | None = None
        killed = 0.0
        start = time.monotonic()
        for index in range(round(rate * duration)):
            at = start + index / rate
            # Keep to the schedule, however long the calls take.
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if kill is None and at - start >= kill_at:
                killed = time.monotonic()
                kill = asyncio.create_task(asyncio.to_thread(primary.go_down))
            calls.append(asyncio.create_task(rerank(stub, rerank_request())))
        answers = await asyncio.gather(*calls)
        assert kill is not None
        await kill
        return answers, start, killed


def failed_over_ids(events: Iterable[dict[str, Any]]) -> set[str]:
    """The upstream request ids of the calls that tried another deployment first: the
    server logs `fallback` with the call's request id, and the call's own line maps it
    to the upstream's id, which the caller got as x-request-id."""
    listed = list(events)
    moved = {event.get("request_id") for event in listed if event.get("event") == "fallback"}
    return {
        upstream_id
        for event in listed
        if event.get("event") == "call" and event.get("request_id") in moved
        for upstream_id in event.get("upstream_request_ids") or ()
    }


def failover(directory: Path, duration: float) -> tuple[str, list[str]]:
    kill_at = FAILOVER_KILL_AT * duration / 10  # 3 s of 10
    primary_settings = {"breaker_cooldown": FAILOVER_COOLDOWN}
    with (
        FakeUpstream(api_key=KEY, models=(MODEL,), latency=LATENCY, record=False) as primary,
        FakeUpstream(api_key=KEY, models=(MODEL,), latency=LATENCY, record=False) as fallback,
        serve(
            directory,
            [deployment(primary, "primary", 0, **primary_settings), deployment(fallback, "fallback", 1)],
        ) as service,
    ):
        run = drive_failover(service.target, primary, FAILOVER_RATE, duration, kill_at)
        answers, start, killed = asyncio.run(run)
        time.sleep(0.2)  # the last log lines
        moved = failed_over_ids(service.events())
    failed = [answer for answer in answers if answer.outcome != "OK"]
    before = [a.seconds for a in answers if a.deployment == "primary" and a.started < killed]
    by_primary = [a for a in answers if a.deployment == "primary"]
    by_fallback = [a for a in answers if a.deployment == "fallback"]
    # Tried the primary first: as it went down (within its cool-down of the kill), or
    # later as a probe of the down primary.
    over = [a for a in by_fallback if a.upstream_id in moved and a.started < killed + FAILOVER_COOLDOWN]
    probes = [a.seconds for a in by_fallback if a.upstream_id in moved and a not in over]
    straight = [a.seconds for a in by_fallback if a.upstream_id not in moved]
    over_seconds = [a.seconds for a in over]
    base50, base99 = percentile(before, 0.5), percentile(before, 0.99)
    over50, over99 = percentile(over_seconds, 0.5), percentile(over_seconds, 0.99)
    spread = max((a.started - killed for a in over), default=0.0)
    outcomes = counts(Counter(a.outcome for a in failed))
    rows = [
        "| measure | value |",
        "| --- | --- |",
        f"| offered | {len(answers)} calls in {duration:g} s ({FAILOVER_RATE:g}/s, open loop); the primary "
        f"stopped {killed - start:.2f} s in |",
        f"| failed calls | {len(failed)}{': ' + outcomes if failed else ''} |",
        f"| answered by the primary | {len(by_primary)}; p50 / p99 {ms(base50)} / {ms(base99)} "
        f"(before it stopped) |",
        f"| answered by the fallback after the primary failed them as it stopped | {len(over)}, started "
        f"up to {ms(spread)} after the stop; p50 / p99 {ms(over50)} / {ms(over99)}: "
        f"{ms(over50 - base50)} / {ms(over99 - base99)} more than the primary's |",
        f"| answered by the fallback after probing the down primary | {len(probes)}; p50 / p99 "
        f"{ms(percentile(probes, 0.5))} / {ms(percentile(probes, 0.99))} |",
        f"| answered by the fallback directly (the primary down) | {len(straight)}; p50 / p99 "
        f"{ms(percentile(straight, 0.5))} / {ms(percentile(straight, 0.99))} |",
    ]
    print("  " + "\n  ".join(rows[2:]), flush=True)
    found = [f"failover: {len(failed)} calls failed: {outcomes}"] if failed else []
    return "\n".join(rows), found


# --- 3. the only deployment down --------------------------------------------------------


async def drive_down(target: str, upstream: FakeUpstream) -> tuple[list[Answer], list[Answer]]:
    """(the calls until the first refusal, then DOWN_CALLS calls DOWN_SPACING apart)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        for _ in range(3):
            await rerank(stub, rerank_request())
        await asyncio.to_thread(upstream.go_down)
        going: list[Answer] = []
        while len(going) < 20 and (not going or going[-1].outcome != "UNAVAILABLE UPSTREAM_CIRCUIT_OPEN"):
            going.append(await rerank(stub, rerank_request()))
        down = []
        start = time.monotonic()
        for index in range(DOWN_CALLS):
            await asyncio.sleep(max(0.0, start + index * DOWN_SPACING - time.monotonic()))
            down.append(await rerank(stub, rerank_request()))
        return going, down


def upstream_down(directory: Path) -> tuple[str, list[str]]:
    with (
        FakeUpstream(api_key=KEY, models=(MODEL,), latency=LATENCY, record=False) as upstream,
        serve(directory, [deployment(upstream, "only", breaker_cooldown=COOLDOWN)]) as service,
    ):
        going, down = asyncio.run(drive_down(service.target, upstream))
    # A refusal never reaches the upstream; a call that carries a probe of it does.
    refused = [answer.seconds for answer in down if not answer.upstream_ms]
    probes = [answer.seconds for answer in down if answer.upstream_ms]
    delays = sorted(answer.retry_delay for answer in down if answer.retry_delay is not None)
    rows = [
        "| measure | value |",
        "| --- | --- |",
        f"| calls until it was down | {tally(going)}; {seconds(sum(a.seconds for a in going))} in all |",
        f"| then {len(down)} calls, {ms(DOWN_SPACING)} apart over {seconds(DOWN_CALLS * DOWN_SPACING)} "
        f"(cool-down {COOLDOWN:g} s) | {tally(down)} |",
        f"| refused without calling the upstream: median / p99 / max | {len(refused)}: "
        f"{ms(percentile(refused, 0.5))} / {ms(percentile(refused, 0.99))} / {ms(max(refused, default=0))} |",
        f"| carrying a probe of the upstream (after each cool-down) | {len(probes)}: "
        f"{', '.join(ms(value) for value in probes) or '-'} |",
        f"| RetryInfo they carry | {f'{delays[0]:g} to {delays[-1]:g} s' if delays else 'none'} |",
    ]
    print("  " + "\n  ".join(rows[2:]), flush=True)
    found = []
    if not refused:
        found.append("down: no call was refused without calling the upstream")
    elif max(refused) >= MAX_DOWN_SECONDS:
        found.append(f"down: a refusal took {ms(max(refused))}")
    # A refusal says the upstream is down; a call that carried a probe says what the probe met.
    expected = {False: "UNAVAILABLE UPSTREAM_CIRCUIT_OPEN", True: "UNAVAILABLE UPSTREAM_UNAVAILABLE"}
    if any(answer.outcome != expected[bool(answer.upstream_ms)] for answer in down):
        found.append(
            "down: expected refusals UPSTREAM_CIRCUIT_OPEN and failed probes UPSTREAM_UNAVAILABLE, "
            f"got {tally(down)}"
        )
    if any(value >= MAX_DOWN_SECONDS for value in probes):
        found.append(f"down: a call carrying a probe took {ms(max(probes))}")
    return "\n".join(rows), found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="each attack's and the failover's length")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args()

    blocks: dict[str, str] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-routes-") as temporary:
        directory = Path(temporary)
        print("fairness", flush=True)
        blocks["routes-fairness"], found = fairness(directory, args.seconds)
        failures += found
        print("flood", flush=True)
        blocks["routes-flood"], found = flood_fairness(directory, args.seconds)
        failures += found
        print("failover", flush=True)
        blocks["routes-failover"], found = failover(directory, args.seconds)
        failures += found
        print("upstream down", flush=True)
        blocks["routes-down"], found = upstream_down(directory)
        failures += found
    setup = (
        "loopback, real `rerank-service serve --config` processes, the fake upstreams (answering after "
        f"{ms(LATENCY)}) and the callers in the benchmark's process; {args.seconds:g} s per attack and for "
        "the failover."
    )
    publish({"routes-machine": machine(setup), **blocks}, not args.no_write, failures)


if __name__ == "__main__":
    main()
