"""structlog set-up: JSON lines by default, a readable console format on a terminal.

Every event passes through a redaction step that masks the configured secrets, a
second line of defence behind never putting them into events at all.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from rerank_service.secret import Secret, redact


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
