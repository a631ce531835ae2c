"""`--drain-delay`: after SIGTERM the server says NOT_SERVING at once but goes on taking
calls for the delay, so health-checking clients and load balancers can move away before
new calls are refused; then it drains as usual and exits 0.

A real `rerank-service serve` process (one, then a supervisor with two workers) in front
of a fake upstream.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import grpc
import pytest
from rerank.v1 import rerank_pb2_grpc

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY
from tests.support.fault_scenarios import health_of, wait_for_health
from tests.support.process import ServiceProcess, run_cli
from tests.support.rpc import request

DELAY = 3.0  # long enough that a loaded machine still calls inside it


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY) as fake:
        yield fake


def _call(target: str) -> str:
    """One Rerank on a new connection: OK or the error's code."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            rerank_pb2_grpc.RerankServiceStub(channel).Rerank(request(), timeout=2)
        except grpc.RpcError as error:
            return str(error.code().name)
    return "OK"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_calls_are_still_taken_during_the_drain_delay_while_health_says_not_serving(
    upstream: FakeUpstream, workers: str
) -> None:
    args = ["--backend", "upstream", "--upstream-url", upstream.url, "--workers", workers]
    args += ["--drain-delay", str(DELAY), "--shutdown-grace", "10"]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service:
        assert service.process is not None
        if workers == "2":  # every worker serving, so the check below can land on either
            deadline = time.monotonic() + 30
            while sum(e.get("event") == "worker serving" for e in service.events()) < 2:
                assert time.monotonic() < deadline, service.output[-3000:]
                time.sleep(0.05)
        assert _call(service.target) == "OK"

        signalled = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        with grpc.insecure_channel(service.target) as channel:
            assert wait_for_health(channel, "NOT_SERVING", timeout=DELAY / 2, service="") == "NOT_SERVING"
        during = [_call(service.target) for _ in range(3)]  # new connections, inside the delay
        inside = time.monotonic() - signalled < DELAY
        code = service.process.wait(timeout=DELAY + 20)
        stopped = time.monotonic() - signalled
        late = _call(service.target)
        with grpc.insecure_channel(service.target) as channel:
            late_health = health_of(channel, "")

    assert inside, "the calls took longer than the delay: nothing was shown"
    assert during == ["OK"] * 3
    assert code == 0, service.output[-3000:]
    assert stopped >= DELAY
    assert late == "UNAVAILABLE"
    assert late_health == "UNAVAILABLE"
    events = [e for e in service.events() if e.get("event") in {"drain delay", "stopped"}]
    assert [e["event"] for e in events].count("drain delay") == int(workers)
    assert all(e["delay_s"] == DELAY for e in events if e["event"] == "drain delay")


def test_a_negative_drain_delay_is_refused_at_start_naming_the_flag(upstream: FakeUpstream) -> None:
    done = run_cli("serve", "--backend", "upstream", "--upstream-url", upstream.url, "--drain-delay", "-1")
    assert done.returncode == 2
    assert "drain_delay" in done.stderr or "drain-delay" in done.stderr, done.stderr
    assert "-1" in done.stderr
