"""One live server for the client suites: the real CLI, upstream backend, a fake upstream, a key."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.support.process import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
CLIENT_KEY = "client-suite-key-0123456789"
UPSTREAM_KEY = "client-suite-upstream-key-0123"


@dataclass(frozen=True)
class LiveServer:
    target: str
    api_key: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "RERANK_TARGET": self.target, "RERANK_API_KEY": self.api_key}


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    with (
        FakeUpstream(api_key=UPSTREAM_KEY) as upstream,
        ServiceProcess(
            ["--backend", "upstream", "--upstream-url", upstream.url],
            env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, "RERANK_API_KEYS": CLIENT_KEY},
            score_cache=True,  # as deployed: the clients' suites read usage.cached_tokens
        ) as service,
    ):
        yield LiveServer(service.target, CLIENT_KEY)
        service.terminate()


def run_suite(script: Path, server: LiveServer, timeout: float = 900) -> None:
    """Run a client's own test suite against the live server; fail with its output."""
    result = subprocess.run(
        ["bash", str(script)],
        cwd=ROOT,
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
