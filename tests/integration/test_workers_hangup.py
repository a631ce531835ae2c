"""`serve --workers 2` and SIGHUP: one to the whole process group while workers start, and
one to the supervisor once its drain has begun.

A SIGHUP to the process group (`systemctl kill -s HUP`, `kill -HUP -PGID`, a terminal's
hangup) reaches every process of it: the supervisor (which reloads), each worker (which
reloads itself, or ignores it while it starts) and multiprocessing's resource tracker.
Real processes in a session of their own, so the group is theirs alone; a worker's start
is held by a test hook (a `sitecustomize` module on their PYTHONPATH, written here) in the
first moments of its interpreter, before any of the service's code runs.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from rerank.v1 import rerank_pb2_grpc

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY
from tests.support.process import ServiceProcess, StartingProcess
from tests.support.rpc import request
from tests.support.waiting import wait_until

ENV = {"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}

# Run by every interpreter of the group at its start; a spawned worker waits there while the
# hold file exists, as a worker still importing and unpickling its settings does.
_HOOK = """
import json
import os
import sys
import time

_HOLD = os.environ.get("RERANK_TEST_HOLD")
if _HOLD and "multiprocessing.spawn" in " ".join(sys.orig_argv) and os.path.exists(_HOLD):
    print(json.dumps({"event": "test: start held", "pid": os.getpid()}), flush=True)
    while os.path.exists(_HOLD):
        time.sleep(0.01)
"""
HELD = "test: start held"


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY) as fake:
        yield fake


class _Group(StartingProcess):
    """`rerank-service serve ARGS` leading a process group (a session) of its own, its JSON
    log lines collected."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        super().__init__(args, env, new_session=True)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, what: str, condition: Any, timeout: float = 60) -> None:
        """Until `condition()`; the test fails (with the output) if the supervisor exits first."""
        wait_until(lambda: condition() or self.process.poll() is not None, timeout, 0.02, what=what)
        assert self.process.poll() is None, f"{what}: exited {self.process.poll()}\n{self.output[-5000:]}"

    def hang_up(self) -> None:
        os.killpg(self.process.pid, signal.SIGHUP)

    def ended(self) -> int:
        """Its exit code, once it has exited by itself, and the last of its output read."""
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=5)
        return code


def _children(pid: int) -> dict[int, str]:
    """`pid`'s child processes: pid → state (R, S, Z…)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        if int(fields[1]) == pid:
            children[int(entry)] = fields[0]
    return children


def _held(group: _Group, pid: int) -> bool:
    return any(e["pid"] == pid for e in group.named(HELD))


def test_a_sighup_to_the_process_group_while_workers_start_stops_none_of_them(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK, encoding="utf-8")
    hold = tmp_path / "hold"
    env = {
        **ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
        "RERANK_TEST_HOLD": str(hold),
    }
    hold.touch()
    group = _Group(["--backend", "upstream", "--upstream-url", upstream.url, "--workers", "2"], env)
    try:
        # Both workers' first start held, before they could ignore a SIGHUP themselves.
        group.wait("both workers held", lambda: len(group.named(HELD)) == 2)
        assert {e["pid"] for e in group.named(HELD)} == {e["pid"] for e in group.named("worker started")}
        group.hang_up()
        group.wait("the supervisor's reload", lambda: len(group.named("reload")) == 1)
        hold.unlink()
        group.wait("both workers ready", lambda: len(group.named("worker ready")) == 2)

        # Again while worker 0 starts again, after it was killed.
        hold.touch()
        victim = next(e["pid"] for e in group.named("worker started") if e["worker"] == 0)
        os.kill(victim, signal.SIGKILL)
        group.wait("worker 0 started again", lambda: len(group.named("worker started")) == 3)
        again = group.named("worker started")[-1]["pid"]
        group.wait("worker 0 held again", lambda: _held(group, again))
        group.hang_up()
        group.wait("the supervisor's second reload", lambda: len(group.named("reload")) == 2)
        hold.unlink()
        group.wait("worker 0 ready again", lambda: len(group.named("worker ready")) == 3)

        assert not group.named("worker start failed"), group.output[-5000:]
        died = [(e["worker"], e.get("signal")) for e in group.named("worker died")]
        assert died == [(0, "SIGKILL")], group.output[-5000:]
        # The two workers and multiprocessing's resource tracker, none of them killed (a zombie).
        children = _children(group.process.pid)
        assert len(children) == 3, children
        assert "Z" not in children.values(), children
        assert group.stop(timeout=60) == 0, group.output[-5000:]
        assert "Traceback" not in group.output
        assert "UserWarning" not in group.output  # the resource tracker was never relaunched
    finally:
        hold.unlink(missing_ok=True)
        if group.process.poll() is None:
            os.killpg(group.process.pid, signal.SIGKILL)
            group.process.wait()


def test_a_sighup_to_the_supervisor_once_its_drain_has_begun_is_ignored(tmp_path: Path) -> None:
    """A config reloader beside a pod that is terminating: the file is not read again (nor
    refused: this edit is broken), and no worker is asked to reload."""
    config = tmp_path / "rerank.yaml"
    with FakeUpstream(api_key=UPSTREAM_KEY, latency=60) as upstream:
        config.write_text(f"backend: upstream\nupstream_url: {upstream.url}\n", encoding="utf-8")
        args = ["--workers", "2", "--config", str(config), "--shutdown-grace", "60"]
        with ServiceProcess(args, env=ENV) as service:
            assert service.process is not None

            def supervisors(name: str) -> list[dict[str, Any]]:
                return [e for e in service.events() if e.get("event") == name and "worker" not in e]

            with grpc.insecure_channel(service.target) as channel:
                # Held by the upstream: the drain lasts until the test cancels the call.
                call = rerank_pb2_grpc.RerankServiceStub(channel).Rerank.future(request(), timeout=120)
                wait_until(lambda: upstream.in_flight == 1, 30, what="the call in flight")
                service.process.send_signal(signal.SIGTERM)
                wait_until(lambda: bool(supervisors("draining")), 30, what="the supervisor draining")
                config.write_text("backend: upstream\nupstream_url: [broken\n", encoding="utf-8")
                service.process.send_signal(signal.SIGHUP)
                handled = ("reload", "reload refused", "reload ignored")
                wait_until(
                    lambda: any(supervisors(name) for name in handled),
                    30,
                    what="the supervisor's SIGHUP handled",
                )
                call.cancel()
            code = service.terminate(timeout=60)

    assert [e["why"] for e in supervisors("reload ignored")] == ["the server is stopping"]
    assert not supervisors("reload"), service.output[-5000:]
    assert not supervisors("reload refused"), service.output[-5000:]
    assert not [e for e in service.events() if e.get("event") in ("reloaded", "reload refused")]
    assert code == 0, service.output[-5000:]


def test_sighups_to_the_process_group_through_a_drain_to_its_end_kill_nothing(upstream: FakeUpstream) -> None:
    """A terminal's hangup, or a reloader's `kill -s HUP`, as the service stops: each process
    ignores a SIGHUP from its drain to its exit, the last moments too, once its event loop
    has closed (it put SIGHUP back to its default action, which kills). The group is sent
    one every few milliseconds from the SIGTERM until the supervisor has exited."""
    group = _Group(["--backend", "upstream", "--upstream-url", upstream.url, "--workers", "2"], ENV)
    try:
        group.wait("both workers ready", lambda: len(group.named("worker ready")) == 2)
        group.process.send_signal(signal.SIGTERM)
        hung_up = 0
        while group.process.poll() is None:
            try:
                group.hang_up()
            except ProcessLookupError:  # the whole group has exited
                break
            hung_up += 1
            # Pacing only: what is asserted holds wherever in the exit the signals land.
            threading.Event().wait(0.003)
        code = group.ended()

        assert hung_up > 0
        stopped = [(e["worker"], e.get("signal"), e.get("exit_code")) for e in group.named("worker stopped")]
        assert sorted(stopped) == [(0, None, 0), (1, None, 0)], group.output[-5000:]
        assert code == 0, group.output[-5000:]
    finally:
        if group.process.poll() is None:
            os.killpg(group.process.pid, signal.SIGKILL)
            group.process.wait()


def test_sighups_through_a_single_servers_drain_to_its_end_kill_nothing(upstream: FakeUpstream) -> None:
    """The same without --workers: the server ignores SIGHUP from its drain to its exit."""
    group = _Group(["--backend", "upstream", "--upstream-url", upstream.url], ENV)
    try:
        group.wait("serving", lambda: bool(group.named("serving")))
        group.process.send_signal(signal.SIGTERM)
        while group.process.poll() is None:
            try:
                group.hang_up()
            except ProcessLookupError:  # it has exited
                break
            threading.Event().wait(0.003)  # pacing only, as above
        code = group.ended()

        assert code == 0, group.output[-5000:]
    finally:
        if group.process.poll() is None:
            os.killpg(group.process.pid, signal.SIGKILL)
            group.process.wait()
