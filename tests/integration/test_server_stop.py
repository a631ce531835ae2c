"""Stopping lets every resource go, even when letting one of them go fails.

A live server with a usage log and a metrics endpoint; its backend's close raises after
closing. The stop still closes the usage log and the metrics endpoint, logs which step
failed, and ends with its `stopped` line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ServerFactory
from tests.support.jaeger_server import listening
from tests.support.logs import LogCapture
from tests.support.rpc import request


def _open_files(path: Path) -> int:
    """How many of this process's file descriptors are open on `path`."""
    target = str(path.resolve())
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                count += 1
        except OSError:
            continue  # closed while listing
    return count


def test_a_backend_whose_close_fails_leaves_nothing_else_open(
    serve: ServerFactory,
    logs: LogCapture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    usage = tmp_path / "usage.jsonl"
    with serve(metrics_port=0, usage_log=str(usage)) as running:
        server = running.server
        assert server is not None
        assert server.metrics_port is not None
        metrics_port = server.metrics_port
        running.stub.Rerank(request(), timeout=10)
        close = server.backend.close

        async def close_then_fail() -> None:
            await close()
            raise RuntimeError("the backend could not close")

        monkeypatch.setattr(server.backend, "close", close_then_fail)
        assert _open_files(usage) == 1
        assert listening(metrics_port)
    # Leaving the block stopped the server.

    failed = [event for event in logs.events() if event.get("event") == "shutdown step failed"]
    assert [(event["step"], event["error"]) for event in failed] == [("backend", "RuntimeError")]
    assert logs.events()[-1]["event"] == "stopped"
    assert _open_files(usage) == 0
    assert not listening(metrics_port)
    assert len(usage.read_text().splitlines()) == 1  # the call was metered before the stop
