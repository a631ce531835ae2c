"""A log event orjson cannot write (an int past 64 bits; a str holding a lone surrogate, as a
--config path that is not UTF-8 is held) is still written whole as a JSON line: the logging
call raised, the line was lost, and what its caller did after it was skipped."""

from __future__ import annotations

from typing import TextIO, cast

import orjson

from rerank_service.observability.logging import configure_logging, get_logger
from tests.support.logs import LogCapture

HUGE = 2**70
NOT_UTF8 = "/etc/rerank/c\udcff.yaml"  # what Python holds for the path's bytes b"c\xff.yaml"


def test_an_int_past_64_bits_and_a_lone_surrogate_are_written_as_json_lines() -> None:
    capture = LogCapture()
    configure_logging("json", "info", stream=cast(TextIO, capture))
    log = get_logger("rerank_service.server")
    try:
        log.info("a huge count", count=HUGE, nested={"count": HUGE})
        log.error("reload refused", error=f"cannot read {NOT_UTF8}", why="é stays")
        log.info("written after them")
    finally:
        configure_logging("json", "info", stream=cast(TextIO, LogCapture()))

    lines = capture.events()  # json: its ints exact, however large
    for line in capture.text.splitlines():
        orjson.loads(line)  # a strict parser, one that takes no lone surrogate's escape, takes them
    assert [line["event"] for line in lines] == ["a huge count", "reload refused", "written after them"]
    huge, refused, _ = lines
    assert (huge["count"], huge["nested"], huge["level"]) == (HUGE, {"count": HUGE}, "info")
    assert refused["error"] == "cannot read /etc/rerank/c\\udcff.yaml"  # the byte shown, not lost
    assert (refused["why"], refused["level"], refused["logger_name"]) == (
        "é stays",
        "error",
        "rerank_service.server",
    )
