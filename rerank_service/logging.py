"""structlog set-up: JSON lines by default, a readable console format on a terminal.

Every event passes through a redaction step that masks the configured secrets, a
second line of defence behind never putting them into events at all.

Every line logged while a call is served carries that call's `request_id`, read from
the call's record (metrics.py) when the line is written: nothing is bound or unbound
per call, so a call that logs nothing pays nothing for it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from rerank_service.metrics import active_call
from rerank_service.secret import Secret, redact


def _add_request_id(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """The request id of the call being served, unless the line names one itself."""
    call = active_call()
    if call is not None and call.request_id is not None:
        event.setdefault("request_id", call.request_id)
    return event


class _RedactSecrets:
    """Mask any configured secret found in an event's string values."""

    def __init__(self, secrets: list[Secret]) -> None:
        self._secrets = [s for s in secrets if s.reveal()]

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        if self._secrets:
            for key, value in event.items():
                if isinstance(value, str):
                    event[key] = redact(value, self._secrets)
        return event


def configure_logging(
    log_format: str = "auto",
    level: str = "info",
    secrets: list[Secret] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for the process. `log_format` is auto, json or console."""
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _RedactSecrets(secrets or []),
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A structlog logger tagged with the module name."""
    return structlog.get_logger(logger_name=name)
