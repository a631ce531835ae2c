"""The real `rerank-service serve` process, with its JSON log lines collected.

Used by the tests and the benchmarks to run the service exactly as an operator does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from tests.support.waiting import wait_until

CLI = [sys.executable, "-m", "rerank_service"]
# The harness's servers run without the score cache unless a test asks for it: the tests
# of faults, overload and shutdown count on every call reaching the upstream.
NO_SCORE_CACHE = {"RERANK_CACHE_MEMORY_MB": "0"}


class ServiceProcess:
    """`with ServiceProcess(args, env) as process:` waits until the server is serving."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        start_timeout: float = 120,
        *,
        score_cache: bool = False,
    ) -> None:
        """`score_cache`: as the product defaults it (on); otherwise off, as in the in-process
        harness (tests/conftest.py), so identical calls each reach the upstream."""
        self.start_timeout = start_timeout
        self.args = args
        self.env = {**os.environ, **({} if score_cache else NO_SCORE_CACHE), **(env or {})}
        self.lines: list[str] = []
        self.port: int | None = None
        self._serving = threading.Event()
        self._reader: threading.Thread | None = None
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServiceProcess:
        self.process = subprocess.Popen(
            [*CLI, "serve", "--host", "127.0.0.1", "--port", "0", "--log-format", "json", *self.args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        reader = self._reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._serving.wait(timeout=0.05):
            code = self.process.poll()
            if code is not None:
                reader.join(timeout=5)
                raise RuntimeError(f"server exited with code {code}:\n{self.output}")
            if time.monotonic() > deadline:
                self.terminate()
                raise RuntimeError("server did not start in time:\n" + self.output)
        return self

    def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            event = _parse(line)
            if event.get("event") == "listening":
                self.port = int(event["port"])
            if event.get("event") == "serving":
                self._serving.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def events(self) -> list[dict[str, Any]]:
        return [event for event in map(_parse, self.lines) if event]

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.read_to_end()
        return code

    def read_to_end(self, timeout: float = 5.0) -> None:
        """Wait until every line of an exited process is read (its output has closed)."""
        if self._reader is not None:
            self._reader.join(timeout=timeout)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def json_object(line: str) -> dict[str, Any] | None:
    """The JSON object a log line holds; None when the line is not one."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _parse(line: str) -> dict[str, Any]:
    return json_object(line) or {}


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `rerank-service ARGS` to completion."""
    return subprocess.run(
        [*CLI, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class StartingProcess:
    """`rerank-service serve ARGS` started, its JSON log lines collected, never waited for to
    serve (ServiceProcess does): for a server that is still starting, or never will.
    `new_session`: it leads a process group (a session) of its own, to be signalled whole."""

    def __init__(self, args: list[str], env: dict[str, str], *, new_session: bool = False) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [*CLI, "serve", "--host", "127.0.0.1", "--port", "0", "--log-format", "json", *args],
            env={**os.environ, **NO_SCORE_CACHE, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=new_session,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def events(self) -> list[dict[str, Any]]:
        return [event for event in map(json_object, list(self.lines)) if event is not None]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events() if event.get("event") == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 120) -> None:
        if not wait_until(lambda: len(self.named(name)) >= count, timeout, 0.02):
            # What it said (an exit at start, a worker that died) is what a failure needs.
            pytest.fail(
                f"{count} {name!r} line(s): not within {timeout:g} s; exit code {self.process.poll()}, "
                "its output:\n" + "".join(self.lines)[-5000:]
            )

    def stop(self, timeout: float) -> int:
        """SIGTERM, then its exit code; it failed the test if it had not exited by `timeout`."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout:g} s after SIGTERM:\n" + "".join(self.lines)[-5000:])
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
