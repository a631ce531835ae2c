"""Admission as /metrics shows it: its bounds, the slots and bytes held, refusals by bound.

Calls are held at a fake upstream that never answers (`Fault(delay=NEVER)`) until their
callers cancel them, so what admission holds is known exactly while they wait: first a
live server in this process, then `serve --workers 2` (real processes), whose workers
copy their counts into the files the supervisor sums.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from rerank.v1 import rerank_pb2_grpc

from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY, ServerFactory
from tests.support.process import ServiceProcess
from tests.support.rpc import code_of, error_info, expect_error, request
from tests.support.scrape import scrape, value
from tests.support.waiting import wait_until


def _metric(port: int, name: str, **labels: str) -> Callable[[], float]:
    return lambda: value(scrape(port), name, **labels)


def test_slots_and_bytes_held_show_while_calls_wait_and_a_refusal_names_its_bound(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.always(Fault(delay=NEVER))
    with serve(metrics_port=0, max_concurrent_requests=2) as server:
        assert server.server is not None
        assert server.server.metrics_port is not None
        port = server.server.metrics_port
        used = _metric(port, "rerank_admission_slots_used")
        assert used() == 0
        held = [server.stub.Rerank.future(request(), timeout=30) for _ in range(2)]
        assert upstream.wait_for(lambda fake: fake.in_flight == 2, timeout=10)

        samples = scrape(port)
        assert value(samples, "rerank_admission_slots_used") == 2
        assert value(samples, "rerank_admission_slots_max") == 2
        assert value(samples, "rerank_admission_bytes_used") == 2 * request().ByteSize()
        assert value(samples, "rerank_admission_open_calls") == 2
        refused = expect_error(lambda: server.stub.Rerank(request(), timeout=5))
        assert code_of(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(refused).reason == "OVERLOADED"  # type: ignore[union-attr]
        for call in held:
            call.cancel()
        # A call gives back its slot, its bytes, then its open call: wait for all three.
        held_now = (
            "rerank_admission_slots_used",
            "rerank_admission_bytes_used",
            "rerank_admission_open_calls",
        )
        wait_until(
            lambda: not any(value(scrape(port), name) for name in held_now),
            timeout=10,
            what="the cancelled calls' slots, bytes and open calls given back",
        )

        samples = scrape(port)
        assert value(samples, "rerank_admission_refusals_total", bound="slots") == 1
        assert value(samples, "rerank_admission_refusals_total", bound="bytes") == 0


def test_with_workers_the_supervisor_serves_the_sum_of_what_each_holds() -> None:
    with FakeUpstream(api_key=UPSTREAM_KEY) as upstream:
        upstream.always(Fault(delay=NEVER))
        args = ["--backend", "upstream", "--upstream-url", upstream.url, "--workers", "2"]
        args += ["--metrics-port", "0", "--max-concurrent-requests", "5"]
        with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service:
            wait_until(
                lambda: len({e["worker"] for e in service.events() if e.get("event") == "worker ready"}) == 2,
                timeout=30,
                what="both workers ready",
            )
            [serving] = [e for e in service.events() if e.get("event") == "serving"]
            port = int(serving["metrics_port"])
            assert value(scrape(port), "rerank_admission_slots_max") == 2 * 5
            # Separate connections, which the kernel spreads over the workers (4 calls: fewer
            # than one worker's 5 slots, however they fall).
            channels = [
                grpc.insecure_channel(service.target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(4)
            ]
            try:
                held = [
                    rerank_pb2_grpc.RerankServiceStub(channel).Rerank.future(request(), timeout=60)
                    for channel in channels
                ]
                assert upstream.wait_for(lambda fake: fake.in_flight == 4, timeout=20)
                used = _metric(port, "rerank_admission_slots_used")
                wait_until(lambda: used() == 4, timeout=10, what="4 slots held, summed over the workers")
                for call in held:
                    call.cancel()
                wait_until(lambda: used() == 0, timeout=10, what="the slots given back")
            finally:
                for channel in channels:
                    channel.close()
            assert service.terminate() == 0
