"""The Go, TypeScript/Node and Java client suites, each run by its own test runner
(go test, node --test, Maven Surefire) against the live server this harness starts.

Each suite covers: a unary call with top_n and return_documents, an INVALID_ARGUMENT
read with its field violation, the bearer token, a deadline, the streaming RPC and
ListModels (see each clients/<language>/README.md).
"""

from __future__ import annotations

import pytest

from tests.clients.conftest import ROOT, LiveServer, run_suite


@pytest.mark.parametrize("language", ["go", "node", "java"])
def test_client_suite_passes_against_the_live_server(live_server: LiveServer, language: str) -> None:
    run_suite(ROOT / "clients" / language / "test.sh", live_server)
