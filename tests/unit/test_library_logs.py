"""aiohttp's and asyncio's own log records: one short JSON line, at most one a kind per interval."""

from __future__ import annotations

import asyncio
import logging
from typing import TextIO, cast
from unittest.mock import Mock

import pytest
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import HttpRequestParser, HttpRequestParserPy

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
    assert event["error"] == "ValueError: 400, message: Invalid header token: b'…'"
    assert event["at"].startswith("test_library_logs.py:")
    assert "Traceback" not in capture.text


def test_opentelemetry_exporter_retries_are_json_lines_too(capsys: pytest.CaptureFixture[str]) -> None:
    """A trace collector that is down makes the exporter log each retry: as text on stderr,
    among the JSON lines, it broke log pipelines that parse each line."""
    capture = LogCapture()
    configure_logging("json", "info", stream=cast(TextIO, capture))
    exporter = logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter")
    for _ in range(5):
        exporter.warning("Transient error %s encountered while exporting traces to %s", "UNAVAILABLE", "h:1")

    (event,) = capture.events()
    assert event["event"] == "Transient error UNAVAILABLE encountered while exporting traces to h:1"
    assert event["level"] == "warning"
    assert capsys.readouterr().err == ""


def test_a_header_line_aiohttp_could_not_parse_never_reaches_the_log() -> None:
    """A caller's token with a stray byte after it (a key read from a CRLF file): aiohttp's
    parser quotes the whole header line in its error, and no configured key masks it."""
    capture = LogCapture()
    configure_logging("json", "info", stream=cast(TextIO, capture))
    raw = b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-CALLERSECRET123\x01\r\n\r\n"
    loop = asyncio.new_event_loop()
    try:
        HttpRequestParser(Mock(), loop, 2**16, max_field_size=16384).feed_data(raw)
    except BadHttpMessage:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "127.0.0.9")
    finally:
        loop.close()

    (event,) = capture.events()
    assert event["error"] == "BadHttpMessage: malformed HTTP message (its text not repeated)"
    assert "CALLERSECRET" not in capture.text


@pytest.mark.parametrize(
    "raw",
    [
        # A body sent as chunked but not chunk-encoded: the parser quotes it as a chunk size.
        b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'{"query":"patient SECRET-4711","documents":["a"]}\r\n',
        # A request target with a control byte: the parser quotes it, its query's token too.
        b"GET /v1/models?access_token=sk-SECRET-0123456789\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-SECRET-0123456789\x01\r\n\r\n",
    ],
    ids=["chunked-body", "request-target", "header-line"],
)
@pytest.mark.parametrize("parser", [HttpRequestParser, HttpRequestParserPy], ids=["default", "pure-python"])
def test_no_request_text_an_aiohttp_parser_quotes_reaches_the_log(
    parser: type[HttpRequestParserPy], raw: bytes
) -> None:
    """aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS=1, PyPy, no C wheel) quotes what
    it could not read as plain text, not as the bytes literal the C parser writes."""
    capture = LogCapture()
    configure_logging("json", "info", stream=cast(TextIO, capture))
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(BadHttpMessage) as refused:
            parser(Mock(), loop, 2**16, max_field_size=16384).feed_data(raw)
    finally:
        loop.close()
    try:
        raise refused.value
    except BadHttpMessage:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "127.0.0.9")

    (event,) = capture.events()
    assert "SECRET" not in capture.text
    assert event["error"] == f"{type(refused.value).__name__}: malformed HTTP message (its text not repeated)"
