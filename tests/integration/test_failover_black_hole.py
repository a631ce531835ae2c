"""A black-holed deployment (its host drops every connection request: gone, or behind a
firewall's DROP) goes down and its route falls over, whatever its callers' deadlines.

Its connects hang rather than fail: the connect timeout (`connect_timeout`) bounds each
within the attempt, and a connect that a caller's shorter deadline cuts after a second
unanswered counts as unreachable too. The black hole is a listener whose accept queue is
full (tests/unit/test_transport.py's `dropping_connections`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from rerank.v1 import rerank_pb2_grpc

from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.core.domain import BackendRequest, CallContext, DeploymentState
from rerank_service.pipeline.record import DEPLOYMENT_KEY
from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY, upstream_settings
from tests.integration.test_routes import (
    KEY_ENV,
    UPSTREAM_MODEL,
    deployment,
    metrics_port,
    service,
    write_config,
)
from tests.integration.test_upstream_http import pki_for
from tests.support.rpc import request
from tests.support.scrape import scrape, value
from tests.support.waiting import wait_until
from tests.unit.test_transport import dropping_connections

REQUEST = BackendRequest(
    model="qwen3-rerank", query="a b", documents=["a b c", "d"], instruct=None, top_n=None
)
DOWN = 2  # rerank_deployment_state of a down deployment

# No proxy or CA bundle from the machine running the tests (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("clean_network_environment")


def black_hole(url: str, name: str, **extra: Any) -> dict[str, Any]:
    """A deployment of the route at `url`, a host that never answers a connection request."""
    return {
        "format": "dashscope",
        "url": url,
        "name": name,
        "model": UPSTREAM_MODEL,
        "api_key_env": KEY_ENV,
        **extra,
    }


def outcome(stub: rerank_pb2_grpc.RerankServiceStub, timeout: float) -> tuple[str, str | None]:
    """A Rerank call's code and the deployment that answered it (None for a failure)."""
    try:
        _, rpc = stub.Rerank.with_call(request(model="search"), timeout=timeout)
    except grpc.RpcError as error:
        return error.code().name, None
    return "OK", {name: str(value) for name, value in rpc.trailing_metadata() or ()}[DEPLOYMENT_KEY]


def test_callers_whose_deadlines_cut_its_connects_get_a_black_holed_deployment_down_and_the_fallback_answers(
    tmp_path: Path,
) -> None:
    with (
        FakeUpstream(api_key=UPSTREAM_KEY, models=(UPSTREAM_MODEL,)) as fallback,
        dropping_connections() as url,
    ):
        config = write_config(
            tmp_path / "routes.yaml",
            {
                "search": [
                    # The connect timeout (5 s by default) is past every caller's deadline here.
                    black_hole(url, "gone", breaker_failures=2, breaker_cooldown=60),
                    deployment(fallback, "fallback", priority=1),
                ]
            },
        )
        with (
            service(config, "--metrics-port", "0") as process,
            grpc.insecure_channel(process.target) as channel,
        ):
            stub = rerank_pb2_grpc.RerankServiceStub(channel)
            seen: list[tuple[str, str | None]] = []

            def answered_by_the_fallback() -> bool:
                # Each call's deadline cuts its connect to the black hole after over a second.
                seen.append(outcome(stub, timeout=2.0))
                return seen[-1] == ("OK", "fallback")

            wait_until(
                answered_by_the_fallback, timeout=30.0, interval=0.0, what="a call answered by the fallback"
            )
            state = value(scrape(metrics_port(process)), "rerank_deployment_state", deployment="gone")
            after = [outcome(stub, timeout=2.0) for _ in range(3)]

    # The calls whose deadlines ran out on the black hole (as before: DEADLINE_EXCEEDED) made it down.
    assert all(code == "DEADLINE_EXCEEDED" for code, _ in seen[:-1]), seen
    assert len(seen) - 1 >= 2  # breaker_failures of them
    assert state == DOWN
    assert after == [("OK", "fallback")] * 3


def test_a_black_holed_deployment_is_unreachable_at_its_connect_timeout_and_the_call_falls_over(
    tmp_path: Path,
) -> None:
    with (
        FakeUpstream(api_key=UPSTREAM_KEY, models=(UPSTREAM_MODEL,)) as fallback,
        dropping_connections() as url,
    ):
        config = write_config(
            tmp_path / "routes.yaml",
            {
                "search": [
                    black_hole(url, "gone", connect_timeout=0.2, breaker_failures=2, retry_backoff=0.01),
                    deployment(fallback, "fallback", priority=1),
                ]
            },
        )
        with (
            service(config, "--metrics-port", "0") as process,
            grpc.insecure_channel(process.target) as channel,
        ):
            stub = rerank_pb2_grpc.RerankServiceStub(channel)
            # Far longer than the connect timeout: without it, the attempt would spend it all.
            first = outcome(stub, timeout=20.0)
            samples = scrape(metrics_port(process))

    # Two attempts, each unreachable at its connect timeout (retried as a refused connect):
    # down, and the call fell over to the fallback within its deadline.
    assert first == ("OK", "fallback")
    assert value(samples, "rerank_upstream_retries_total", reason="unreachable") == 1
    assert value(samples, "rerank_deployment_state", deployment="gone") == DOWN


async def test_a_call_cancelled_while_its_connect_went_unanswered_for_a_second_counts_as_unreachable() -> (
    None
):
    """grpc cancels a call at its deadline, which may come before the transport's own timer:
    the attempt it cuts counts as unreachable just the same."""
    with FakeUpstream(api_key=UPSTREAM_KEY) as unused, dropping_connections() as url:
        settings = upstream_settings(unused, upstream_url=url, upstream_breaker_failures=1)
        backend = UpstreamBackend.from_config(UpstreamDeploymentConfig.from_settings(settings))
        await backend.start()
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5):  # cancels the call, as grpc does at a deadline
                    await backend.rerank(REQUEST, CallContext())
            assert backend.health.state is DeploymentState.DOWN
        finally:
            await backend.close()


@contextlib.contextmanager
def held_relay(target: tuple[str, int], released: threading.Event) -> Iterator[int]:
    """The port of a relay to `target` that accepts every connection at once (the TCP connect
    is answered) and passes nothing on until `released`: a TLS handshake as slow as it is."""

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def relay(client: socket.socket) -> None:
        released.wait()
        with client, socket.create_connection(target) as upstream:
            forward = threading.Thread(target=pipe, args=(client, upstream), daemon=True)
            forward.start()
            pipe(upstream, client)
            forward.join()

    def accept(listener: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                client, _ = listener.accept()
                threading.Thread(target=relay, args=(client,), daemon=True).start()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        threading.Thread(target=accept, args=(listener,), daemon=True).start()
        try:
            yield listener.getsockname()[1]
        finally:
            released.set()


def test_callers_whose_deadlines_cut_a_slow_tls_handshake_do_not_get_a_reachable_deployment_down(
    tmp_path: Path,
) -> None:
    """Only the TCP connect has to be answered within a second: a deployment whose TLS handshake
    takes longer than a short deadline is slow, not unreachable (a black hole still is: above)."""
    pki = pki_for(tmp_path)
    released = threading.Event()
    with (
        FakeUpstream(api_key=UPSTREAM_KEY, models=(UPSTREAM_MODEL,), tls=pki.server) as upstream,
        held_relay(upstream.address, released) as port,
    ):
        config = write_config(
            tmp_path / "routes.yaml",
            {
                "search": [
                    black_hole(
                        f"https://localhost:{port}",
                        "slow",
                        ca_file=str(pki.ca),
                        breaker_failures=2,
                        breaker_cooldown=60,
                    )
                ]
            },
        )
        with service(config) as process, grpc.insecure_channel(process.target) as channel:
            stub = rerank_pb2_grpc.RerankServiceStub(channel)
            # Each deadline cuts its call's TLS handshake after over a second, more than
            # breaker_failures times.
            cut = [outcome(stub, timeout=1.5) for _ in range(3)]
            released.set()  # the handshakes go through now
            after = outcome(stub, timeout=30.0)

    assert cut == [("DEADLINE_EXCEEDED", None)] * 3
    assert after == ("OK", "slow")
