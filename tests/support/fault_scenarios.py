"""The fault and abuse scenarios of the reliability suite, and how to run them.

Each `Scenario` says what the upstream does (faults for the fake upstream), the
caller's deadline, and what the caller must see: the status code and ErrorInfo
reason, how many upstream attempts the service makes, and how long it may take.
`tests/integration/test_fault_suite.py` asserts every one of them (and that nothing
is left behind); `bench/reliability.py` measures every one against a live
`rerank-service serve` and writes the table in docs/RELIABILITY.md. The circuit
breaker, overload and shutdown scenarios are sequences, run by their own functions
here for the same two users.

The service runs with its defaults (3 attempts, backoff 0.1 s doubling up to 2 s,
full jitter, breaker at 5 failures) except for `SERVICE_SETTINGS` and a scenario's
own `settings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.observability.metrics import code_name
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault, RecordedRequest
from tests.support.process import ServiceProcess

Code = grpc.StatusCode

# On top of the service's defaults, for every scenario (as Settings field names).
SERVICE_SETTINGS: Mapping[str, Any] = {"upstream_timeout": 5.0}
RERANK_SERVICE = "rerank.v1.RerankService"
HEALTH_SERVICES = ("", RERANK_SERVICE)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Log event of the service for each retry (how attempts are counted when the
# upstream refuses connections, so the fake sees nothing).
RETRY_EVENT = "upstream retry"
FIFTY_MB = 50 * 1024 * 1024


def rerank_request(**fields: Any) -> rerank_pb2.RerankRequest:
    values: dict[str, Any] = {
        "model": "qwen3-rerank",
        "query": "red apple",
        "documents": ["a red apple", "a car"],
    }
    values.update(fields)
    return rerank_pb2.RerankRequest(**values)


def as_flags(settings: Mapping[str, Any]) -> list[str]:
    """Settings field names → `rerank-service serve` flags."""
    return [part for name, value in settings.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def _html(status: str) -> bytes:
    return f"<html><head><title>{status}</title></head><body><h1>{status}</h1></body></html>".encode()


def _never_fully_sent(calls: list[RecordedRequest]) -> str | None:
    """The service stopped reading the 50 MB body (at its 16 MiB limit)."""
    if len(calls) != 1:
        return f"expected one upstream request, saw {len(calls)}"
    call = calls[0]
    if call.answered or call.body_bytes_sent >= FIFTY_MB:
        return f"the service read the whole {call.body_bytes_sent}-byte body instead of stopping at 16 MiB"
    return None


@dataclass(frozen=True)
class Scenario:
    name: str
    upstream: str  # what the upstream does, in words
    code: grpc.StatusCode
    # The ErrorInfo reasons accepted; the first is the one expected. None: no ErrorInfo
    # (a success, or a deadline the client's own timer ends before the server answers).
    reasons: tuple[str | None, ...]
    attempts: int  # upstream attempts the service makes
    max_seconds: float  # the call's duration bound (never past the deadline)
    deadline: float = 5.0  # the caller's gRPC deadline, seconds
    min_seconds: float = 0.0
    faults: tuple[Fault, ...] = ()  # answers for the next requests, in order
    cycle: tuple[Fault, ...] = ()  # answers in turn, over and over
    down: bool = False  # nothing listens: connections are refused
    retry_delay: float | None = None  # the RetryInfo the caller must get
    settings: Mapping[str, Any] = field(default_factory=dict)
    # More checks on the upstream requests the call made: a problem, or None.
    check: Callable[[list[RecordedRequest]], str | None] | None = None

    @property
    def expected(self) -> str:
        reason = self.reasons[0]
        return self.code.name + (f" {reason}" if reason else "")


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "slower than the caller's deadline",
        "never answers",
        Code.DEADLINE_EXCEEDED,
        ("UPSTREAM_TIMEOUT", None),
        attempts=1,
        deadline=1.0,
        min_seconds=0.9,
        max_seconds=1.5,
        faults=(Fault(delay=NEVER),),
    ),
    Scenario(
        "slower than --upstream-timeout",
        "never answers; upstream timeout 0.5 s",
        Code.DEADLINE_EXCEEDED,
        ("UPSTREAM_TIMEOUT",),
        attempts=1,
        min_seconds=0.45,
        max_seconds=1.0,
        faults=(Fault(delay=NEVER),),
        settings={"upstream_timeout": 0.5},
    ),
    Scenario(
        "body trickles, within the deadline",
        "16 bytes every 20 ms",
        Code.OK,
        (None,),
        attempts=1,
        min_seconds=0.15,
        max_seconds=1.5,
        faults=(Fault(trickle=(16, 0.02)),),
    ),
    Scenario(
        "body trickles past the upstream timeout",
        "1 byte every 50 ms (each read is quick); upstream timeout 1 s",
        Code.DEADLINE_EXCEEDED,
        ("UPSTREAM_TIMEOUT",),
        attempts=1,
        min_seconds=0.95,
        max_seconds=1.6,
        faults=(Fault(trickle=(1, 0.05)),),
        settings={"upstream_timeout": 1.0},
    ),
    Scenario(
        "connection reset before the answer",
        "RST after reading the request, 3 times",
        Code.UNAVAILABLE,
        ("UPSTREAM_UNAVAILABLE",),
        attempts=3,
        max_seconds=1.0,
        faults=(Fault(reset=True),) * 3,
    ),
    Scenario(
        "connection reset mid-body",
        "headers and 40 body bytes, then RST, 3 times",
        Code.UNAVAILABLE,
        ("UPSTREAM_UNAVAILABLE",),
        attempts=3,
        max_seconds=1.0,
        faults=(Fault(reset_after_bytes=40),) * 3,
    ),
    Scenario(
        "connection reset mid-body once",
        "headers and 40 body bytes, then RST; then a normal answer",
        Code.OK,
        (None,),
        attempts=2,
        max_seconds=1.0,
        faults=(Fault(reset_after_bytes=40),),
    ),
    Scenario(
        "truncated JSON",
        '200 application/json `{"output": {"res`',
        Code.UNAVAILABLE,
        ("UPSTREAM_BAD_RESPONSE",),
        attempts=1,
        max_seconds=1.0,
        faults=(Fault(body=b'{"output": {"res'),),
    ),
    Scenario(
        "wrong content type",
        "200 text/html page",
        Code.UNAVAILABLE,
        ("UPSTREAM_BAD_RESPONSE",),
        attempts=1,
        max_seconds=1.0,
        faults=(Fault(body=_html("Welcome"), content_type="text/html"),),
    ),
    Scenario(
        "gateway error page",
        "502 text/html page from a proxy, 3 times",
        Code.UNAVAILABLE,
        ("UPSTREAM_UNAVAILABLE",),
        attempts=3,
        max_seconds=1.0,
        faults=(Fault(status=502, body=_html("502 Bad Gateway"), content_type="text/html"),) * 3,
    ),
    Scenario(
        "50 MB body",
        "200 valid JSON padded to 50 MB",
        Code.UNAVAILABLE,
        ("UPSTREAM_BAD_RESPONSE",),
        attempts=1,
        max_seconds=3.0,
        faults=(Fault(pad_to=FIFTY_MB),),
        check=_never_fully_sent,
    ),
    Scenario(
        "burst of 503, then success",
        "503 twice, then a normal answer",
        Code.OK,
        (None,),
        attempts=3,
        max_seconds=1.0,
        faults=(Fault(status=503),) * 2,
    ),
    Scenario(
        "503 on every attempt",
        "503 three times",
        Code.UNAVAILABLE,
        ("UPSTREAM_UNAVAILABLE",),
        attempts=3,
        max_seconds=1.0,
        faults=(Fault(status=503),) * 3,
    ),
    Scenario(
        "500 is not retried",
        "500 once",
        Code.UNAVAILABLE,
        ("UPSTREAM_UNAVAILABLE",),
        attempts=1,
        max_seconds=1.0,
        faults=(Fault(status=500),),
    ),
    Scenario(
        "400 is not retried",
        "400 once",
        Code.INVALID_ARGUMENT,
        ("UPSTREAM_REJECTED_REQUEST",),
        attempts=1,
        max_seconds=1.0,
        faults=(Fault(status=400, body={"code": "InvalidParameter", "message": "no"}),),
    ),
    Scenario(
        "429 with Retry-After, within the deadline",
        "429 Retry-After: 1, then a normal answer",
        Code.OK,
        (None,),
        attempts=2,
        deadline=5.0,
        min_seconds=1.0,
        max_seconds=1.8,
        faults=(Fault(status=429, headers={"Retry-After": "1"}),),
    ),
    Scenario(
        "429 with Retry-After past the deadline",
        "429 Retry-After: 30 (a retry would succeed)",
        Code.RESOURCE_EXHAUSTED,
        ("UPSTREAM_RATE_LIMITED",),
        attempts=1,
        deadline=2.0,
        max_seconds=0.5,
        retry_delay=30.0,
        faults=(Fault(status=429, headers={"Retry-After": "30"}),),
    ),
    Scenario(
        "429 on every attempt",
        "429 without Retry-After, 3 times",
        Code.RESOURCE_EXHAUSTED,
        ("UPSTREAM_RATE_LIMITED",),
        attempts=3,
        max_seconds=1.0,
        faults=(Fault(status=429),) * 3,
    ),
    Scenario(
        "flapping upstream",
        "503, reset, success, over and over",
        Code.OK,
        (None,),
        attempts=3,
        max_seconds=1.0,
        cycle=(Fault(status=503), Fault(reset=True), Fault()),
    ),
    Scenario(
        "upstream down",
        "nothing listens: connection refused",
        Code.UNAVAILABLE,
        ("UPSTREAM_UNAVAILABLE",),
        attempts=3,
        max_seconds=1.0,
        down=True,
    ),
)


@dataclass(frozen=True)
class Observation:
    """What one call of a scenario looked like from the caller and the upstream."""

    code: grpc.StatusCode
    reason: str | None
    retry_delay: float | None
    attempts: int
    seconds: float
    message: str = ""
    upstream_problem: str | None = None
    next_call: grpc.StatusCode = Code.OK  # a valid call right after, upstream healthy again

    @property
    def seen(self) -> str:
        return self.code.name + (f" {self.reason}" if self.reason else "")


def problems(scenario: Scenario, seen: Observation) -> list[str]:
    """Every way `seen` differs from what `scenario` promises (empty: as promised)."""
    found = []
    if seen.code != scenario.code or seen.reason not in scenario.reasons:
        found.append(f"expected {scenario.expected}, got {seen.seen}: {seen.message}")
    if seen.attempts != scenario.attempts:
        found.append(f"expected {scenario.attempts} upstream attempts, saw {seen.attempts}")
    if not scenario.min_seconds <= seen.seconds <= scenario.max_seconds:
        found.append(f"took {seen.seconds:.3f} s, outside [{scenario.min_seconds}, {scenario.max_seconds}] s")
    if scenario.retry_delay is not None and seen.retry_delay != scenario.retry_delay:
        found.append(f"expected RetryInfo {scenario.retry_delay} s, got {seen.retry_delay}")
    if seen.upstream_problem:
        found.append(seen.upstream_problem)
    if seen.next_call != Code.OK:
        found.append(f"the next valid call failed with {seen.next_call.name}")
    return found


def error_reason(error: grpc.RpcError) -> str | None:
    info = _detail(error, error_details_pb2.ErrorInfo)
    return info.reason if info is not None else None


def error_retry_delay(error: grpc.RpcError) -> float | None:
    info = _detail(error, error_details_pb2.RetryInfo)
    return info.retry_delay.ToMilliseconds() / 1000 if info is not None else None


def _detail(error: grpc.RpcError, kind: Any) -> Any:
    # Blocking and asyncio errors alike carry code(), details() and trailing_metadata().
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    return None


def call(
    stub: rerank_pb2_grpc.RerankServiceStub, deadline: float, request: rerank_pb2.RerankRequest | None = None
) -> tuple[grpc.StatusCode, str | None, float | None, float, str]:
    """One Rerank: (code, ErrorInfo reason, RetryInfo seconds, duration, message)."""
    started = time.monotonic()
    try:
        stub.Rerank(request or rerank_request(), timeout=deadline)
    except grpc.RpcError as error:
        seconds = time.monotonic() - started
        return error.code(), error_reason(error), error_retry_delay(error), seconds, error.details() or ""
    return Code.OK, None, None, time.monotonic() - started, ""


def arm(upstream: FakeUpstream, scenario: Scenario) -> None:
    upstream.reset()
    for fault in scenario.faults:
        upstream.inject(fault)
    if scenario.cycle:
        upstream.cycle(scenario.cycle)
    if scenario.down:
        upstream.go_down()


def disarm(upstream: FakeUpstream) -> None:
    upstream.come_back()
    upstream.reset()


def run_round(
    stub: rerank_pb2_grpc.RerankServiceStub,
    upstream: FakeUpstream,
    scenario: Scenario,
    retries_logged: Callable[[], int],
) -> Observation:
    """Arm the fault, make the call, heal the upstream, then make one valid call.

    `retries_logged` counts the service's retry log events so far; attempts are
    counted from it only when the upstream is down (the fake then sees nothing).
    """
    arm(upstream, scenario)
    requests_before, retries_before = len(upstream.requests), retries_logged()
    code, reason, delay, seconds, message = call(stub, scenario.deadline)
    # The fake has finished with every attempt (noticed hang-ups, written what it could).
    upstream.wait_for(lambda fake: fake.in_flight == 0, timeout=10)
    calls = upstream.requests[requests_before:]
    attempts = 1 + retries_logged() - retries_before if scenario.down else len(calls)
    upstream_problem = scenario.check(calls) if scenario.check is not None else None
    disarm(upstream)
    next_code = call(stub, 5.0)[0]
    return Observation(code, reason, delay, attempts, seconds, message, upstream_problem, next_code)


# --- the circuit breaker: a sequence of calls ------------------------------------

BREAKER_SETTINGS: Mapping[str, Any] = {"upstream_breaker_failures": 5, "upstream_breaker_cooldown": 1.0}


@dataclass(frozen=True)
class BreakerStep:
    name: str
    upstream: str
    expected: str
    seen: Observation
    health: str = ""  # rerank.v1.RerankService's health right after the call (readiness)
    liveness: str = ""  # the server's ("" service) health then
    problems: list[str] = field(default_factory=list)


def health_of(channel: grpc.Channel, service: str = RERANK_SERVICE) -> str:
    """A health service's status, or the code of the error the check got."""
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    except grpc.RpcError as error:
        return str(error.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def wait_for_health(channel: grpc.Channel, wanted: str, timeout: float, service: str = RERANK_SERVICE) -> str:
    """Poll health until it reads `wanted` (or `timeout` passes); the last reading."""
    end = time.monotonic() + timeout
    while (seen := health_of(channel, service)) != wanted and time.monotonic() < end:
        time.sleep(0.02)
    return seen


def run_breaker(channel: grpc.Channel, upstream: FakeUpstream) -> list[BreakerStep]:
    """An upstream that answers errors is still called; one that cannot be reached goes down.

    With 3 attempts a call and 5 failures: two calls answered 503 fail after 3 attempts
    each and leave health SERVING (an upstream that answers is ejected, never refused: a
    caller whose requests make it fail must not refuse everyone else). Then the upstream
    stops listening: the 3rd call fails after 3 refused connections, the 4th goes down
    on its 2nd (the 5th in a row), and calls are refused at once while the service's
    health (readiness) is NOT_SERVING and the server's ("", liveness) stays SERVING;
    after the cool-down one probe goes through to the recovered upstream, succeeds,
    and health is SERVING again.
    """
    stub = rerank_pb2_grpc.RerankServiceStub(channel)
    steps: list[BreakerStep] = []

    def step(
        name: str,
        what: str,
        code: grpc.StatusCode,
        reasons: tuple[str | None, ...],
        attempts: int,
        health: str,
        health_timeout: float = 0.5,
    ) -> Observation:
        before = len(upstream.requests)
        got_code, reason, delay, seconds, message = call(stub, 5.0)
        upstream.wait_for(lambda fake: fake.in_flight == 0, timeout=5)
        seen = Observation(got_code, reason, delay, len(upstream.requests) - before, seconds, message)
        found = []
        expected = code.name + (f" {reasons[0]}" if reasons[0] else "")
        if got_code != code or reason not in reasons:
            found.append(f"{name}: expected {expected}, got {seen.seen}: {message}")
        if seen.attempts != attempts:
            found.append(f"{name}: expected {attempts} upstream attempts, saw {seen.attempts}")
        # Health follows the circuit's readiness events: allow the probe a moment to see it.
        readiness = wait_for_health(channel, health, health_timeout)
        if readiness != health:
            found.append(f"{name}: {RERANK_SERVICE} health expected {health}, got {readiness}")
        liveness = health_of(channel, "")
        if liveness != "SERVING":
            found.append(f"{name}: the server's health expected SERVING, got {liveness}")
        steps.append(
            BreakerStep(name, what, f"{expected}, {attempts} attempts", seen, readiness, liveness, found)
        )
        return seen

    upstream.reset()
    upstream.always(Fault(status=503))
    step("1st call", "503 to everything", Code.UNAVAILABLE, ("UPSTREAM_UNAVAILABLE",), 3, "SERVING", 0)
    step("2nd call", "503 to everything", Code.UNAVAILABLE, ("UPSTREAM_UNAVAILABLE",), 3, "SERVING", 0)
    upstream.always(None)
    upstream.go_down()
    step("3rd call", "connections refused", Code.UNAVAILABLE, ("UPSTREAM_UNAVAILABLE",), 0, "SERVING", 0)
    step(
        "4th call: the 5th refused connection in a row: down",
        "connections refused",
        Code.UNAVAILABLE,
        ("UPSTREAM_CIRCUIT_OPEN", "UPSTREAM_UNAVAILABLE"),
        0,
        "NOT_SERVING",
    )
    upstream.come_back()
    refused = step(
        "5th call, down", "recovered", Code.UNAVAILABLE, ("UPSTREAM_CIRCUIT_OPEN",), 0, "NOT_SERVING"
    )
    if refused.seconds > 0.1:
        steps[-1].problems.append(f"5th call: refused after {refused.seconds:.3f} s, not at once")
    if refused.retry_delay is None:
        steps[-1].problems.append("5th call: no RetryInfo saying when to come back")
    # The cool-down is the behaviour under test: wait as long as the service said to.
    time.sleep((refused.retry_delay or BREAKER_SETTINGS["upstream_breaker_cooldown"]) + 0.05)
    step("probe call after the cool-down", "recovered", Code.OK, (None,), 1, "SERVING", 1.0)
    step("next call", "recovered", Code.OK, (None,), 1, "SERVING", 0)
    return steps


# --- overload: more calls than the service takes ---------------------------------

OVERLOAD_FLAGS = ("--max-concurrent-requests", "8", "--max-message-bytes", "65536")
OVERLOAD_LATENCY = 0.2  # the fake upstream's, seconds: capacity 8 / 0.2 = 40 calls/s


@dataclass
class OverloadResult:
    rate: float  # calls started per second
    seconds: float  # how long calls were started for
    codes: Counter[str] = field(default_factory=Counter)  # "OK", "RESOURCE_EXHAUSTED OVERLOADED", ...
    ok_seconds: list[float] = field(default_factory=list)
    refused_seconds: list[float] = field(default_factory=list)
    health: Counter[str] = field(default_factory=Counter)  # health checks during the burst
    rss_before: int = 0  # bytes, after a warm-up
    rss_peak: int = 0  # the most sampled during the burst
    rss_after: int = 0
    recovery_seconds: float = 0.0  # one call right after the burst
    recovery_code: str = ""

    @property
    def sent(self) -> int:
        return sum(self.codes.values())


def memory_bytes(pid: int, field_name: str) -> int:
    """A memory figure of /proc/PID/status, in bytes: VmRSS (resident now), VmHWM (its peak)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} for process {pid}")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS), in bytes."""
    return memory_bytes(pid, "VmRSS")


def open_fds(pid: int) -> int:
    """File descriptors a process holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


async def drive_overload(target: str, pid: int, rate: float, seconds: float) -> OverloadResult:
    """Start `rate` calls a second for `seconds` (open loop: whatever the answers),
    sampling the server's memory and health, then make one call to see it recover."""
    result = OverloadResult(rate, seconds)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(3):  # warm up both hops
            await stub.Rerank(rerank_request(), timeout=5)
        result.rss_before = result.rss_peak = rss_bytes(pid)

        async def one() -> None:
            started = time.monotonic()
            try:
                await stub.Rerank(rerank_request(), timeout=5)
            except grpc.RpcError as error:
                taken = time.monotonic() - started
                reason = error_reason(error)
                result.codes[error.code().name + (f" {reason}" if reason else "")] += 1
                if error.code() == Code.RESOURCE_EXHAUSTED:
                    result.refused_seconds.append(taken)
                return
            result.ok_seconds.append(time.monotonic() - started)
            result.codes["OK"] += 1

        async def watch() -> None:
            while True:
                result.rss_peak = max(result.rss_peak, rss_bytes(pid))
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    result.health[health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)] += 1
                except grpc.RpcError as error:
                    result.health[error.code().name] += 1
                await asyncio.sleep(0.1)  # the watcher's pace, not synchronisation

        watcher = asyncio.create_task(watch())
        calls = []
        start = time.monotonic()
        for index in range(round(rate * seconds)):
            # Keep to the schedule, however long the calls take.
            await asyncio.sleep(max(0.0, start + index / rate - time.monotonic()))
            calls.append(asyncio.create_task(one()))
        await asyncio.gather(*calls)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        started = time.monotonic()
        try:
            await stub.Rerank(rerank_request(), timeout=5)
            result.recovery_code = "OK"
        except grpc.RpcError as error:
            result.recovery_code = error.code().name
        result.recovery_seconds = time.monotonic() - started
        result.rss_after = rss_bytes(pid)
    return result


def oversized_message_code(target: str, size: int) -> tuple[str, str | None]:
    """Send one request of about `size` bytes; (code, then a valid call's code)."""
    with grpc.insecure_channel(target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        big = rerank_request(documents=["x" * 1024] * (size // 1024 + 1))
        code = call(stub, 5.0, big)[0].name
        return code, call(stub, 5.0)[0].name


# --- shutdown: SIGTERM with calls and a stream in flight -------------------------

SHUTDOWN_LATENCY = 1.0  # the fake upstream's, seconds: every call is in flight this long
SHUTDOWN_GRACE = 10.0


@dataclass
class ShutdownResult:
    calls: int
    stream_items: int
    unary: Counter[str] = field(default_factory=Counter)  # code of each unary call
    stream_answers: Counter[str] = field(default_factory=Counter)  # "OK" or the item's error code
    stream_code: str = ""  # the stream's own status
    health_after_signal: list[str] = field(default_factory=list)  # readings until refused
    late_call: str = ""  # a call started once the server stopped taking new ones
    exit_code: int | None = None
    exit_seconds: float = 0.0  # SIGTERM to exit
    in_flight_at_signal: int = 0  # upstream requests in flight when SIGTERM was sent
    upstream_abandoned: int = 0  # upstream requests the service hung up on


async def sigterm_in_flight(
    service: ServiceProcess, upstream: FakeUpstream, calls: int, items: int, grace: float = SHUTDOWN_GRACE
) -> ShutdownResult:
    """Start `calls` unary calls and a stream of `items`, wait until every one is at the
    upstream, send SIGTERM, then half-close the stream and collect every answer. `grace`:
    the service's --shutdown-grace."""
    assert service.process is not None
    result = ShutdownResult(calls, items)
    outbox: asyncio.Queue[rerank_pb2.RerankStreamRequest | None] = asyncio.Queue()

    async def stream_items() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        while (item := await outbox.get()) is not None:
            yield item

    async with grpc.aio.insecure_channel(service.target) as channel:
        stub = rerank_pb2_grpc.RerankServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def unary() -> str:
            try:
                await stub.Rerank(rerank_request(), timeout=30)
            except grpc.RpcError as error:
                return error.code().name
            return "OK"

        async def consume() -> None:
            stream = stub.RerankStream(stream_items(), timeout=30)
            try:
                async for answer in stream:
                    kind = answer.WhichOneof("result")
                    result.stream_answers["OK" if kind == "response" else code_name(answer.error.code)] += 1
                result.stream_code = "OK"
            except grpc.RpcError as error:
                result.stream_code = error.code().name

        unary_calls = [asyncio.create_task(unary()) for _ in range(calls)]
        consumer = asyncio.create_task(consume())
        for index in range(items):
            await outbox.put(rerank_pb2.RerankStreamRequest(id=f"item-{index}", request=rerank_request()))
        in_flight, waited = calls + items, time.monotonic()
        while not await asyncio.to_thread(upstream.wait_for, lambda fake: fake.in_flight >= in_flight, 0.1):
            ended = [task.result() for task in unary_calls if task.done()]
            if ended or consumer.done() or time.monotonic() - waited > 10:
                raise RuntimeError(
                    f"only {upstream.in_flight} of {in_flight} calls reached the upstream; "
                    f"calls that ended already: {Counter(ended)}, stream: {result.stream_code or 'open'}"
                )
        result.in_flight_at_signal = upstream.in_flight
        signalled = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        # Half-closed at once: its items in flight are still answered. (After the health
        # checks below, on a loaded machine, the items could be answered first: a draining
        # stream then ends UNAVAILABLE, as its client had not said it was done.)
        await outbox.put(None)
        # Health turns NOT_SERVING, then the server stops taking calls at all.
        while time.monotonic() - signalled < grace:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                reading = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as error:
                reading = error.code().name
            if not result.health_after_signal or result.health_after_signal[-1] != reading:
                result.health_after_signal.append(reading)
            if reading not in ("SERVING", "NOT_SERVING"):
                break
            await asyncio.sleep(0.01)
        result.late_call = await unary()
        result.unary.update(await asyncio.gather(*unary_calls))
        await consumer
    result.exit_code = await asyncio.to_thread(service.process.wait, grace + 5)
    result.exit_seconds = time.monotonic() - signalled
    service.read_to_end()  # its last lines (`stopped`) read before anyone looks
    await asyncio.to_thread(upstream.wait_for, lambda fake: fake.in_flight == 0, 5)
    result.upstream_abandoned = len(upstream.abandoned)
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
