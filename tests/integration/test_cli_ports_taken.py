"""`serve` with a port another process holds: one line naming the port's setting, exit 1, and
nothing it had opened before left open or half started."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY, upstream_settings
from tests.support.jaeger_server import listening
from tests.support.process import run_cli
from tests.support.server import ServerThread


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port a plain socket listens on (as another service would) for the test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("setting", ["metrics-port", "http-port"])
def test_serve_on_a_taken_port_exits_1_with_one_line_naming_the_setting(
    upstream: FakeUpstream, held_port: int, setting: str
) -> None:
    result = run_cli(
        "serve", "--host", "127.0.0.1", "--backend", "upstream", "--upstream-url", upstream.url,
        "--port", "0", f"--{setting}", str(held_port),
        env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY},
    )  # fmt: skip

    assert result.returncode == 1, result.stderr
    # One line: no traceback, and no warning of a grpc server left running as the loop closed.
    assert result.stderr.strip().splitlines() == [
        f"rerank-service: cannot start: {setting} {held_port}: "
        f"cannot listen on 127.0.0.1:{held_port} (Address already in use)"
    ]


def test_serve_on_a_taken_grpc_port_names_the_port_setting(upstream: FakeUpstream, held_port: int) -> None:
    result = run_cli(
        "serve", "--host", "127.0.0.1", "--backend", "upstream", "--upstream-url", upstream.url,
        "--port", str(held_port), "--metrics-port", "0",
        env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY},
    )  # fmt: skip

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    # grpc's own core may log a line of its own first; ours is the last.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rerank-service: cannot start: port {held_port}: cannot listen on 127.0.0.1:")


def test_a_taken_http_port_closes_the_grpc_and_metrics_ports_opened_before_it(
    upstream: FakeUpstream, held_port: int
) -> None:
    settings = upstream_settings(upstream, metrics_port=0, http_port=held_port)
    with ServerThread(settings, start=False) as running:
        server = running.server
        assert server is not None
        with pytest.raises((OSError, RuntimeError)) as refused:
            running.run(server.start())
        opened = {"port": server.grpc.port, "metrics-port": server.metrics_port}

        assert None not in opened.values(), opened  # both had opened before the HTTP port failed
        assert {name for name, port in opened.items() if port is not None and listening(port)} == set()
        assert f"http-port {held_port}" in str(refused.value)
