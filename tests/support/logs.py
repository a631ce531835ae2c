"""Capture the service's structured log lines as parsed JSON objects."""

from __future__ import annotations

import io
import json
import threading
import time
from typing import Any


class LogCapture(io.TextIOBase):
    """A thread-safe text sink for structlog's JSON renderer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: list[str] = []

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer.append(text)
        return len(text)

    def isatty(self) -> bool:
        return False

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self._buffer)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def calls(self) -> list[dict[str, Any]]:
        """The access-log lines (one per RerankService call)."""
        return [event for event in self.events() if event.get("event") == "call"]

    def wait_for_calls(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The access-log lines once there are `count` of them (each is written just
        after its call's status goes out, so a client can see the status first)."""
        deadline = time.monotonic() + timeout
        while len(calls := self.calls()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return calls

    def clear(self) -> None:
        with self._lock:
            self._buffer.clear()
