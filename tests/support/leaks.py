"""Check that a scenario leaves nothing behind: tasks, file descriptors, connections.

The server runs in this process (tests/support/server.py), so its asyncio tasks can
be counted on its own loop; file descriptors are this process's (server, client
channel and fake upstream together: a socket the service forgets to close shows,
and so does one the fake keeps); connections are the fake upstream's own count of
those it holds open. Pooled keep-alive connections are expected and reused, so the
check is "no growth": after a warm-up call of a scenario, N more calls of the same
scenario must settle back to the counts taken after the first.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.support.fault_scenarios import open_fds
from tests.support.server import ServerThread


@dataclass(frozen=True, order=True)
class Resources:
    tasks: int  # asyncio tasks on the server's loop
    fds: int  # open file descriptors of this process
    connections: int  # connections the fake upstream holds open

    def exceeds(self, baseline: Resources) -> bool:
        return (
            self.tasks > baseline.tasks or self.fds > baseline.fds or self.connections > baseline.connections
        )


async def _tasks_besides_this_one() -> int:
    return len(asyncio.all_tasks()) - 1


class LeakChecker:
    def __init__(self, server: ServerThread, upstream: FakeUpstream) -> None:
        self.server = server
        self.upstream = upstream
        self.pid = os.getpid()

    def snapshot(self) -> Resources:
        return Resources(
            tasks=self.server.run(_tasks_besides_this_one()),
            fds=open_fds(self.pid),
            connections=self.upstream.open_connections,
        )

    def baseline(self, settle: float = 1.0) -> Resources:
        """The counts once the calls before have finished closing what they close.

        Connections a failed attempt broke are closed by both ends a moment after the
        caller has its answer; wait until the fake holds no more than the pool keeps
        (one connection per call in flight: none now, so at most the warm one).
        """
        self.upstream.wait_for(lambda fake: fake.in_flight == 0 and fake.open_connections <= 1, settle)
        return self.snapshot()

    def growth(self, baseline: Resources, settle: float = 3.0) -> Resources | None:
        """None if the counts come back to `baseline` within `settle` seconds, else the last counts.

        Nothing signals that a socket was closed, so this polls.
        """
        end = time.monotonic() + settle
        while (now := self.snapshot()).exceeds(baseline):
            if time.monotonic() > end:
                return now
            time.sleep(0.02)
        return None
