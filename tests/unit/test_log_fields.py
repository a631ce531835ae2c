"""A process's own log fields (a worker's `worker` and `pid`): on every line, whatever thread
writes it. grpc calls some of the service's code on threads of its own (a certificate
renewal's callback), where context variables bound on the event loop's thread are unset."""

from __future__ import annotations

import threading
from typing import TextIO, cast

from rerank_service.observability.logging import configure_logging, get_logger
from tests.support.logs import LogCapture


def test_a_processs_fields_are_on_lines_written_from_any_thread() -> None:
    capture = LogCapture()
    configure_logging("json", "info", stream=cast(TextIO, capture), fields={"worker": 3, "pid": 4242})
    log = get_logger("rerank_service.tls")
    try:
        log.info("on the main thread")
        other = threading.Thread(target=lambda: log.info("on grpc's thread"))
        other.start()
        other.join()
        log.info("a field of its own wins", worker=7)
    finally:
        configure_logging("json", "info", stream=cast(TextIO, LogCapture()))  # no fields for later tests

    lines = {event["event"]: event for event in capture.events()}
    assert (lines["on the main thread"]["worker"], lines["on the main thread"]["pid"]) == (3, 4242)
    assert (lines["on grpc's thread"]["worker"], lines["on grpc's thread"]["pid"]) == (3, 4242)
    assert lines["a field of its own wins"]["worker"] == 7
