"""Routes against a real `rerank-service serve --config FILE` process and fake upstreams.

The `models:` section of the file names routes (the model a caller sends) over
deployments (fake upstreams on loopback, each its own FakeUpstream). Each test writes
the file, starts the real server, and calls it as a client does: weights and priorities
pick the deployment, failures fall over to another one, a request's own 4xx never does,
a down deployment is refused at once and probed back, one caller's poison cannot deny
the others, SIGHUP reloads the file under load, and a bad file names its place.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.pipeline.record import DEPLOYMENT_KEY
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY
from tests.support.process import ServiceProcess, run_cli
from tests.support.rpc import code_of, error_info, expect_error, request, retry_delay, trailing
from tests.support.scrape import scrape, value

Code = grpc.StatusCode
# The model name the fake upstreams know; routes have names of their own and send this one.
UPSTREAM_MODEL = "qwen3-rerank"
# Each deployment's key comes from this variable (api_key_env), set for the server only.
KEY_ENV = "ROUTES_TEST_UPSTREAM_KEY"


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def east() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY, models=(UPSTREAM_MODEL,)) as upstream:
        yield upstream


@pytest.fixture
def west() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY, models=(UPSTREAM_MODEL,)) as upstream:
        yield upstream


def deployment(upstream: FakeUpstream, name: str, **extra: Any) -> dict[str, Any]:
    """One deployment of a route, as the file writes it."""
    return {
        "format": "dashscope",
        "url": upstream.url,
        "name": name,
        "model": UPSTREAM_MODEL,
        "api_key_env": KEY_ENV,
        **extra,
    }


def write_config(path: Path, routes: dict[str, list[dict[str, Any]]]) -> Path:
    models = [{"name": name, "deployments": deployments} for name, deployments in routes.items()]
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False), encoding="utf-8")
    return path


def service(config: Path, *flags: str) -> ServiceProcess:
    return ServiceProcess(["--config", str(config), *flags], env={KEY_ENV: UPSTREAM_KEY})


def stub_of(channel: grpc.Channel) -> rerank_pb2_grpc.RerankServiceStub:
    return rerank_pb2_grpc.RerankServiceStub(channel)


def call(
    stub: rerank_pb2_grpc.RerankServiceStub, model: str, query: str = "red apple", timeout: float = 10
) -> tuple[rerank_pb2.RerankResponse, str]:
    """A successful Rerank call and the deployment that answered it (x-deployment)."""
    response, rpc = stub.Rerank.with_call(request(model=model, query=query), timeout=timeout)
    metadata = {name: str(value) for name, value in rpc.trailing_metadata() or ()}
    return response, metadata[DEPLOYMENT_KEY]


def answered_by(fake: FakeUpstream, model: str = UPSTREAM_MODEL) -> int:
    """Requests a fake upstream received for `model`."""
    return sum(
        1
        for recorded in fake.requests
        if isinstance(recorded.body, dict) and recorded.body.get("model") == model
    )


def wait_for_event(process: ServiceProcess, name: str, after: int = 0, timeout: float = 10) -> dict[str, Any]:
    """The first log event called `name` among the events after the first `after`."""
    deadline = time.monotonic() + timeout
    while True:
        found = [event for event in process.events()[after:] if event.get("event") == name]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {name!r} log line within {timeout} s:\n{process.output}"
        time.sleep(0.02)


def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.02)


def metrics_port(process: ServiceProcess) -> int:
    serving = next(event for event in process.events() if event.get("event") == "serving")
    return int(serving["metrics_port"])


class Caller(threading.Thread):
    """Calls `model` one call after another until stopped; records every outcome."""

    def __init__(self, target: str, model: str, query: str = "red apple", timeout: float = 10) -> None:
        super().__init__(daemon=True)
        self.target, self.model, self.query, self.timeout = target, model, query, timeout
        self.stop = threading.Event()
        self.answered: Counter[str] = Counter()  # deployment -> successful calls
        self.failures: list[str] = []  # "CODE reason: details" of each failed call

    @property
    def calls(self) -> int:
        return sum(self.answered.values()) + len(self.failures)

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = stub_of(channel)
            while not self.stop.is_set():
                try:
                    _, name = call(stub, self.model, self.query, self.timeout)
                except grpc.RpcError as error:
                    info = error_info(error)
                    reason = info.reason if info is not None else "-"
                    self.failures.append(f"{error.code().name} {reason}: {error.details()}")
                else:
                    self.answered[name] += 1

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        assert not self.is_alive()


# --- 1. weights --------------------------------------------------------------------------------


def test_weights_share_the_calls_of_one_priority(
    tmp_path: Path, east: FakeUpstream, west: FakeUpstream
) -> None:
    config = write_config(
        tmp_path / "routes.yaml",
        {"search": [deployment(east, "east", weight=3), deployment(west, "west", weight=1)]},
    )
    calls = 1000
    with service(config) as process, grpc.insecure_channel(process.target) as channel:
        stub = stub_of(channel)
        named = Counter(call(stub, "search")[1] for _ in range(calls))

    # Every call reached exactly one upstream, once, and x-deployment named that one.
    assert len(east.requests) + len(west.requests) == calls
    assert named == {"east": len(east.requests), "west": len(west.requests)}
    # 3:1 is 75 % : 25 %; the binomial's standard deviation at 1,000 calls is 1.4 points,
    # so 7 points is 5 of them (one run in 3 million fails by chance), while an even split
    # (50 %) or 2:1 (67 %) is still told apart.
    assert abs(len(east.requests) / calls - 0.75) < 0.07, named
    # The route's name is not the upstream's: each deployment sent its own `model`.
    assert answered_by(east) + answered_by(west) == calls


# --- 2. a deployment goes down and comes back ---------------------------------------------------


def test_a_deployment_that_goes_down_loses_its_calls_to_the_other_then_gets_them_back(
    tmp_path: Path, east: FakeUpstream, west: FakeUpstream
) -> None:
    cooldown = 0.5
    overrides = {"breaker_failures": 2, "breaker_cooldown": cooldown, "retry_backoff": 0.01}
    config = write_config(
        tmp_path / "routes.yaml",
        {"search": [deployment(east, "east", **overrides), deployment(west, "west", **overrides)]},
    )
    with service(config, "--metrics-port", "0") as process:
        port = metrics_port(process)
        callers = [Caller(process.target, "search") for _ in range(2)]
        for caller in callers:
            caller.start()
        try:
            assert east.wait_for(lambda fake: len(fake.requests) >= 20)
            assert west.wait_for(lambda fake: len(fake.requests) >= 20)

            east.go_down()  # calls in flight there are cut; new connections are refused
            # It is judged down (rerank_deployment_state 2) and the other takes every call.
            eventually(
                lambda: value(scrape(port), "rerank_deployment_state", deployment="east") == 2,
                what="east down",
            )
            during = len(west.requests)
            assert west.wait_for(lambda fake: len(fake.requests) >= during + 100)

            east.come_back()
            back = len(east.requests)
            # After the cool-down a probe gets through, and east is in the rotation again:
            # not one probe but a share of the calls.
            assert east.wait_for(lambda fake: len(fake.requests) >= back + 30, timeout=cooldown + 10)
            eventually(
                lambda: value(scrape(port), "rerank_deployment_state", deployment="east") == 0,
                what="east healthy",
            )
        finally:
            for caller in callers:
                caller.finish()
        events = process.events()

    # Not one call failed, before, while or after east was down.
    assert [failure for caller in callers for failure in caller.failures] == []
    answered = sum((caller.answered for caller in callers), Counter[str]())
    assert set(answered) == {"east", "west"}
    # The calls that were on east when it went down moved to west.
    fallbacks = [event for event in events if event.get("event") == "fallback"]
    assert fallbacks
    assert {event["failed"] for event in fallbacks} == {"east"}


# --- 3. the request's own 4xx is not worth another deployment ----------------------------------


@pytest.mark.parametrize(
    ("status", "expected", "reason"),
    [
        (400, Code.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST"),
        (422, Code.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST"),
    ],
)
def test_a_4xx_is_returned_at_once_and_the_other_deployment_never_sees_the_request(
    tmp_path: Path,
    east: FakeUpstream,
    west: FakeUpstream,
    status: int,
    expected: grpc.StatusCode,
    reason: str,
) -> None:
    # Priorities make the first choice certain: east first, west its fallback.
    config = write_config(
        tmp_path / "routes.yaml",
        {"search": [deployment(east, "east", priority=0), deployment(west, "west", priority=1)]},
    )
    east.always(Fault(status=status, body={"code": "Nope", "message": "not this", "request_id": "r-4xx"}))
    with service(config) as process, grpc.insecure_channel(process.target) as channel:
        error = expect_error(lambda: stub_of(channel).Rerank(request(model="search"), timeout=10))
        events = process.events()

    assert code_of(error) == expected
    info = error_info(error)
    assert info is not None
    assert info.reason == reason
    assert trailing(error)[DEPLOYMENT_KEY] == "east"
    assert len(east.requests) == 1  # not retried either
    assert west.requests == []
    assert [event for event in events if event.get("event") == "fallback"] == []


@pytest.mark.parametrize("status", [401, 403])
def test_a_deployment_whose_own_key_is_refused_falls_back_to_one_with_a_key_of_its_own(
    tmp_path: Path, east: FakeUpstream, west: FakeUpstream, status: int
) -> None:
    """The service's own key for east was revoked: west, with a key of its own, answers
    (east's refusal counts against its health: tests/unit/test_retry.py)."""
    config = write_config(
        tmp_path / "routes.yaml",
        {"search": [deployment(east, "east", priority=0), deployment(west, "west", priority=1)]},
    )
    east.always(
        Fault(status=status, body={"code": "InvalidApiKey", "message": "revoked", "request_id": "r-k"})
    )
    with service(config, "--metrics-port", "0") as process, grpc.insecure_channel(process.target) as channel:
        port = metrics_port(process)
        named = call(stub_of(channel), "search")[1]
        samples = scrape(port)
        events = process.events()

    assert named == "west"
    assert len(east.requests) == 1  # not retried: the key would be refused again
    assert len(west.requests) == 1
    fallbacks = [event for event in events if event.get("event") == "fallback"]
    assert [(event["failed"], event["reason"]) for event in fallbacks] == [("east", "UPSTREAM_AUTH_FAILED")]
    assert (
        value(samples, "rerank_deployment_calls_total", route="search", deployment="east", code="INTERNAL")
        == 1
    )


def test_a_deployment_whose_upstream_answers_404_falls_back_and_stays_healthy_for_its_other_routes(
    tmp_path: Path, east: FakeUpstream, west: FakeUpstream
) -> None:
    """Route `retired` sends east a retired model id: the operator's config, not the caller's
    request (the caller named a route the service serves), so its calls fall over to west.
    But east is one deployment (one health) for route `search` too, whose model it serves:
    a 404 is about one model, and must not eject it (tests/unit/test_retry.py), or every
    `search` call would move to west for as long as `retired`'s callers call."""
    failures = 3  # breaker_failures
    east_of: dict[str, Any] = {"priority": 0, "breaker_failures": failures, "breaker_cooldown": 60}
    config = write_config(
        tmp_path / "routes.yaml",
        {
            "search": [deployment(east, "east", **east_of), deployment(west, "west", priority=1)],
            "retired": [
                deployment(east, "east", **east_of, model="retired-model"),
                deployment(west, "west", priority=1),
            ],
        },
    )
    with service(config, "--metrics-port", "0") as process, grpc.insecure_channel(process.target) as channel:
        port = metrics_port(process)
        stub = stub_of(channel)
        retired = Counter(call(stub, "retired")[1] for _ in range(2 * failures))
        search = Counter(call(stub, "search")[1] for _ in range(3))
        samples = scrape(port)
        events = process.events()

    assert retired == {"west": 2 * failures}
    assert search == {"east": 3}  # east still first for the model it serves
    assert value(samples, "rerank_deployment_state", deployment="east") == 0
    assert answered_by(east, "retired-model") == 2 * failures  # each 404 once: not retried
    fallbacks = [event for event in events if event.get("event") == "fallback"]
    assert [(event["failed"], event["reason"]) for event in fallbacks] == [("east", "UPSTREAM_NOT_FOUND")] * (
        2 * failures
    )
    # No call failed, so no access-log line quotes the upstream: the fallback line does.
    assert all("Model not exist: retired-model" in event["details"] for event in fallbacks)
    # What RerankUpstreamNotFound (deploy/prometheus/alerts.yaml) watches.
    assert (
        value(samples, "rerank_deployment_calls_total", route="retired", deployment="east", code="NOT_FOUND")
        == 2 * failures
    )


def test_when_every_deployment_answers_404_the_caller_gets_not_found_with_the_upstreams_words(
    tmp_path: Path, east: FakeUpstream, west: FakeUpstream
) -> None:
    config = write_config(
        tmp_path / "routes.yaml",
        {
            "search": [
                deployment(east, "east", priority=0, model="retired-model"),
                deployment(west, "west", priority=1, model="misspelt-model"),
            ]
        },
    )
    with service(config) as process, grpc.insecure_channel(process.target) as channel:
        error = expect_error(lambda: stub_of(channel).Rerank(request(model="search"), timeout=10))

    # The last attempt's failure: west's, tried after east's 404.
    assert code_of(error) == Code.NOT_FOUND
    info = error_info(error)
    assert info is not None
    assert info.reason == "UPSTREAM_NOT_FOUND"
    assert info.metadata["upstream_status"] == "404"
    assert "Model not exist: misspelt-model" in str(error.details())
    assert UPSTREAM_KEY not in str(error.details())
    assert trailing(error)[DEPLOYMENT_KEY] == "west"
    assert (answered_by(east, "retired-model"), answered_by(west, "misspelt-model")) == (1, 1)


# --- 4. priorities: the fallback tier serves when the first fails ------------------------------


def test_a_failing_priority_0_deployment_falls_back_to_priority_1(
    tmp_path: Path, east: FakeUpstream, west: FakeUpstream
) -> None:
    config = write_config(
        tmp_path / "routes.yaml",
        {
            "search": [
                deployment(east, "east", priority=0, retry_backoff=0.01),
                deployment(west, "west", priority=1),
            ]
        },
    )
    east.always(Fault(status=503, body={"code": "Busy", "message": "overloaded", "request_id": "r-503"}))
    calls = 20
    with service(config, "--metrics-port", "0") as process, grpc.insecure_channel(process.target) as channel:
        port = metrics_port(process)
        stub = stub_of(channel)
        named = Counter(call(stub, "search")[1] for _ in range(calls))
        samples = scrape(port)
        events = process.events()

    assert named == {"west": calls}
    assert len(west.requests) == calls
    # East was tried (503s, retried) before west served; once ejected it is tried last,
    # so later calls go to west directly.
    assert east.requests
    fallbacks = [event for event in events if event.get("event") == "fallback"]
    assert fallbacks
    assert {(event["route"], event["failed"], event["reason"]) for event in fallbacks} == {
        ("search", "east", "UPSTREAM_UNAVAILABLE")
    }
    assert value(samples, "rerank_route_fallbacks_total", route="search") == len(fallbacks)
    assert (
        value(samples, "rerank_deployment_calls_total", route="search", deployment="west", code="OK") == calls
    )
    assert value(
        samples, "rerank_deployment_calls_total", route="search", deployment="east", code="UNAVAILABLE"
    ) == len(fallbacks)
    # The access log names the deployment that answered.
    logged = [event for event in events if event.get("event") == "call" and event.get("code") == "OK"]
    assert len(logged) == calls
    assert {event["deployment"] for event in logged} == {"west"}


# --- 5. one caller's poison does not deny the others -------------------------------------------


@pytest.mark.parametrize(
    "poison",
    [
        Fault(status=500, body={"code": "InternalError", "message": "boom", "request_id": "r-500"}),
        Fault(body=b"garbage"),
    ],
    ids=["500", "malformed-200"],
)
def test_a_poisoning_caller_cannot_deny_service_to_a_well_behaved_one(
    tmp_path: Path, east: FakeUpstream, poison: Fault
) -> None:
    marker = "poison-pill"
    east.poison(marker, poison)
    config = write_config(tmp_path / "routes.yaml", {"search": [deployment(east, "east")]})
    with service(config) as process:
        attackers = [Caller(process.target, "search", query=f"{marker} red apple") for _ in range(4)]
        victim = Caller(process.target, "search")
        for caller in [*attackers, victim]:
            caller.start()
        time.sleep(3.0)  # a span of load, not a wait for an event
        for caller in [victim, *attackers]:
            caller.finish()

    # The well-behaved caller was served throughout: the deployment, the route's only
    # one, may be ejected by the attack but is never refused for it.
    assert victim.calls >= 20
    assert len(victim.failures) <= 0.01 * victim.calls, victim.failures[:5]
    # The poison ran: every attacking call failed, and there were plenty of them, each
    # with the upstream's own failure (not a refusal).
    attacks = sum(attacker.calls for attacker in attackers)
    assert attacks >= 50
    assert sum(sum(attacker.answered.values()) for attacker in attackers) == 0
    assert {failure.split(":")[0] for attacker in attackers for failure in attacker.failures} == {
        "UNAVAILABLE UPSTREAM_UNAVAILABLE" if poison.status == 500 else "UNAVAILABLE UPSTREAM_BAD_RESPONSE"
    }


# --- 6. an upstream really down is refused fast ------------------------------------------------


def test_an_upstream_that_is_down_is_refused_fast_with_circuit_open(
    tmp_path: Path, east: FakeUpstream
) -> None:
    # A long cool-down: no probe goes through while the refusals are timed.
    config = write_config(
        tmp_path / "routes.yaml",
        {"search": [deployment(east, "east", breaker_cooldown=30, retry_backoff=0.01)]},
    )
    with service(config) as process, grpc.insecure_channel(process.target) as channel:
        stub = stub_of(channel)
        call(stub, "search")  # up, and the channel is connected
        east.go_down()

        # The first calls try it (unreachable, retried); once unreachable five times in a
        # row (breaker_failures' default) it is down.
        reasons = []
        for _ in range(10):
            error = expect_error(lambda: stub.Rerank(request(model="search"), timeout=10))
            assert code_of(error) == Code.UNAVAILABLE
            info = error_info(error)
            assert info is not None
            reasons.append(info.reason)
            if info.reason == "UPSTREAM_CIRCUIT_OPEN":
                break
        assert reasons[-1] == "UPSTREAM_CIRCUIT_OPEN", reasons
        assert set(reasons[:-1]) <= {"UPSTREAM_UNAVAILABLE"}

        durations = []
        for _ in range(20):
            started = time.perf_counter()
            error = expect_error(lambda: stub.Rerank(request(model="search"), timeout=10))
            durations.append(time.perf_counter() - started)
            info = error_info(error)
            assert code_of(error) == Code.UNAVAILABLE
            assert info is not None
            assert info.reason == "UPSTREAM_CIRCUIT_OPEN"
            assert trailing(error)[DEPLOYMENT_KEY] == "east"
            delay = retry_delay(error)
            assert delay is not None
            assert 0 < delay <= 30

    # Refused without touching the network: a gRPC round trip. The median of 20, measured
    # by the client, so one slow call on a busy 2-core machine does not decide.
    assert statistics.median(durations) < 0.050, durations


# --- 7. SIGHUP reloads the file under load ------------------------------------------------------


def test_sighup_reloads_the_routes_under_load_and_refuses_a_bad_file(
    tmp_path: Path, east: FakeUpstream, west: FakeUpstream
) -> None:
    path = tmp_path / "routes.yaml"
    write_config(path, {"search": [deployment(east, "east")]})
    with service(path) as process, grpc.insecure_channel(process.target) as channel:
        assert process.process is not None
        stub = stub_of(channel)
        error = expect_error(lambda: stub.Rerank(request(model="other"), timeout=10))
        assert code_of(error) == Code.NOT_FOUND  # not a route yet

        load = Caller(process.target, "search")
        load.start()
        try:
            assert east.wait_for(lambda fake: len(fake.requests) >= 20)
            connections = east.connections_accepted

            # Add west to the route, and a route of its own.
            write_config(
                path,
                {
                    "search": [deployment(east, "east"), deployment(west, "west")],
                    "other": [deployment(west, "west")],
                },
            )
            seen = len(process.events())
            process.process.send_signal(signal.SIGHUP)
            reloaded = wait_for_event(process, "reloaded", after=seen)
            assert reloaded["routes"] == {"search": ["east", "west"], "other": ["west"]}

            assert call(stub, "other")[1] == "west"
            assert west.wait_for(lambda fake: answered_by(fake) >= 20)  # search's calls too
            east_before = len(east.requests)
            assert east.wait_for(lambda fake: len(fake.requests) >= east_before + 20)
            # East was kept as it was (the same settings): its connections too.
            assert east.connections_accepted == connections

            # A bad file is refused; the routes loaded last keep serving.
            write_config(
                path,
                {
                    "search": [deployment(east, "east"), deployment(west, "west", url="ftp://west")],
                    "other": [deployment(west, "west")],
                },
            )
            seen = len(process.events())
            process.process.send_signal(signal.SIGHUP)
            refused = wait_for_event(process, "reload refused", after=seen)
            assert "models[0].deployments[1].url" in refused["error"]

            assert call(stub, "other")[1] == "west"
            west_before, east_before = len(west.requests), len(east.requests)
            assert west.wait_for(lambda fake: len(fake.requests) >= west_before + 20)
            assert east.wait_for(lambda fake: len(fake.requests) >= east_before + 20)
        finally:
            load.finish()

    # Not one call failed across both reloads.
    assert load.failures == []
    assert set(load.answered) == {"east", "west"}


def rss_mib(process: ServiceProcess) -> float:
    """The server process's resident memory, from /proc."""
    assert process.process is not None
    status = Path(f"/proc/{process.process.pid}/status").read_text(encoding="utf-8")
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kib) / 1024


def test_sighup_refuses_an_empty_file_a_dropped_models_section_or_a_backend_change_and_keeps_serving(
    tmp_path: Path, east: FakeUpstream
) -> None:
    path = tmp_path / "routes.yaml"
    write_config(path, {"search": [deployment(east, "east")]})
    to_local = {"search": [{"format": "local", "source": "bundled"}]}
    refused_files = [
        ("", "is empty"),  # truncated, or caught mid-write
        ("# being rewritten\n", "is empty"),
        ("log_level: info\n", "has no models: section any more"),
        (yaml.safe_dump({"models": [{"name": "search", "deployments": to_local["search"]}]}), "to local"),
    ]
    with service(path) as process, grpc.insecure_channel(process.target) as channel:
        assert process.process is not None
        stub = stub_of(channel)
        assert call(stub, "search")[1] == "east"
        rss_before = rss_mib(process)

        for text, why in refused_files:
            path.write_text(text, encoding="utf-8")
            seen = len(process.events())
            process.process.send_signal(signal.SIGHUP)
            refused = wait_for_event(process, "reload refused", after=seen)
            assert why in refused["error"], refused
            assert call(stub, "search")[1] == "east"  # the old routes serve on
        # Nothing was built for the refused files: no model loaded, no torch.
        assert rss_mib(process) < rss_before + 64
        assert not [event for event in process.events() if event.get("event") == "reloaded"]

        # The file says it means it: the same upstream, now from the flags' settings.
        key_file = tmp_path / "upstream.key"
        key_file.write_text(UPSTREAM_KEY, encoding="utf-8")
        path.write_text(
            yaml.safe_dump(
                {
                    "allow_backend_change": True,
                    "backend": "upstream",
                    "upstream_url": east.url,
                    "upstream_models": [UPSTREAM_MODEL],
                    "upstream_api_key_file": str(key_file),
                }
            ),
            encoding="utf-8",
        )
        seen = len(process.events())
        process.process.send_signal(signal.SIGHUP)
        reloaded = wait_for_event(process, "reloaded", after=seen)
        host = east.url.removeprefix("http://")
        assert reloaded["routes"] == {UPSTREAM_MODEL: [host]}
        assert call(stub, UPSTREAM_MODEL)[1] == host
        error = expect_error(lambda: stub.Rerank(request(model="search"), timeout=10))
        assert code_of(error) == Code.NOT_FOUND


# --- 8. a bad file at start -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "place"),
    [
        ({"url": "ftp://west"}, "models[0].deployments[1].url"),
        ({"url": None}, "models[0].deployments[1]"),
        ({"weight": 0}, "models[0].deployments[1].weight"),
        ({"api_key_env": "ROUTES_TEST_UNSET_VARIABLE"}, "models[0].deployments[1].api_key_env"),
    ],
    ids=["bad-url", "no-url", "weight-0", "unset-key-variable"],
)
def test_a_bad_file_stops_serve_and_check_config_with_exit_2_naming_the_place(
    tmp_path: Path, east: FakeUpstream, west: FakeUpstream, second: dict[str, Any], place: str
) -> None:
    bad = {key: value for key, value in {**deployment(west, "west"), **second}.items() if value is not None}
    config = write_config(tmp_path / "routes.yaml", {"search": [deployment(east, "east"), bad]})
    env = {KEY_ENV: UPSTREAM_KEY}

    served = run_cli("serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0", env=env)
    checked = run_cli("check-config", str(config), env=env)

    for result in (served, checked):
        assert result.returncode == 2, result.stderr
        assert "configuration error" in result.stderr
        assert f"{place} " in result.stderr or f"{place}." in result.stderr, result.stderr
        assert str(config) in result.stderr
    # Nothing was served, nothing was called.
    assert east.requests == west.requests == []


def test_check_config_accepts_a_good_file_and_lists_its_routes(
    tmp_path: Path, east: FakeUpstream, west: FakeUpstream
) -> None:
    config = write_config(
        tmp_path / "routes.yaml",
        {
            "search": [deployment(east, "east", weight=3), deployment(west, "west", priority=1)],
            "other": [deployment(west, "west")],
        },
    )

    checked = run_cli("check-config", str(config), env={KEY_ENV: UPSTREAM_KEY})

    assert checked.returncode == 0, checked.stderr
    assert "2 routes, 2 deployments" in checked.stdout
    assert "east (priority 0, weight 3)" in checked.stdout
    assert "west (priority 1, weight 1)" in checked.stdout


# --- 9. ListModels lists the routes ------------------------------------------------------------


def test_list_models_lists_the_routes_and_their_deployments(
    tmp_path: Path, east: FakeUpstream, west: FakeUpstream
) -> None:
    config = write_config(
        tmp_path / "routes.yaml",
        {
            "search": [
                deployment(east, "east", weight=3, retry_backoff=0.01),
                deployment(west, "west", priority=1),
            ],
            "other": [deployment(west, "west")],
        },
    )
    with service(config) as process, grpc.insecure_channel(process.target) as channel:
        stub = stub_of(channel)
        listed = stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=10)

        # East goes down: the calls fall back to west, and ListModels tells.
        east.go_down()

        def east_state() -> int:
            assert call(stub, "search")[1] == "west"
            models = stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=10).models
            return int(models[0].deployments[0].state)

        eventually(lambda: east_state() == rerank_pb2.DEPLOYMENT_STATE_DOWN, what="east listed down")

    assert [model.name for model in listed.models] == ["search", "other"]
    search, other = listed.models
    assert (search.backend, search.format, search.upstream_url) == ("upstream", "dashscope", east.url)
    assert (other.backend, other.format, other.upstream_url) == ("upstream", "dashscope", west.url)
    assert search.max_documents > 0
    assert other.max_documents > 0
    assert [
        (d.name, d.backend, d.format, d.upstream_url, d.priority, d.weight, d.state)
        for d in search.deployments
    ] == [
        ("east", "upstream", "dashscope", east.url, 0, 3, rerank_pb2.DEPLOYMENT_STATE_HEALTHY),
        ("west", "upstream", "dashscope", west.url, 1, 1, rerank_pb2.DEPLOYMENT_STATE_HEALTHY),
    ]
    assert [(d.name, d.priority, d.weight) for d in other.deployments] == [("west", 0, 1)]
