"""aiohttp's and asyncio's own log records: one short JSON line, at most one a kind per interval."""

from __future__ import annotations

import logging
from typing import TextIO, cast

from rerank_service.observability.logging import RateLimit, configure_logging
from tests.support.logs import LogCapture


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_key_and_interval_and_the_next_counts_those_left_out() -> None:
    clock = Clock()
    limit = RateLimit(10.0, clock)

    first = [limit.allow("a") for _ in range(5)]
    other = limit.allow("b")
    clock.now += 10.0
    later = limit.allow("a")

    assert first == [0, None, None, None, None]
    assert other == 0
    assert later == 4


def test_a_library_traceback_becomes_one_json_line_and_repeats_are_left_out() -> None:
    capture = LogCapture()
    configure_logging("json", "info", stream=cast(TextIO, capture))
    try:
        raise ValueError("400, message:\n  Invalid header token:\n\n    b'Bad Header'")
    except ValueError:
        for _ in range(100):
            logging.getLogger("aiohttp.server").exception("Error handling request from %s", "127.0.0.9")

    events = capture.events()
    assert len(capture.text.splitlines()) == 1
    (event,) = events
    assert event["logger_name"] == "aiohttp.server"
    assert event["event"] == "Error handling request from 127.0.0.9"
    assert event["error"] == "ValueError: 400, message: Invalid header token: b'Bad Header'"
    assert event["at"].startswith("test_library_logs.py:")
    assert "Traceback" not in capture.text
