"""structlog set-up: JSON lines by default, a readable console format on a terminal.

Every event passes through a redaction step that masks the configured secrets, a
second line of defence behind never putting them into events at all.

Every line logged while a call is served carries that call's `request_id`, read from
request_id.py when the line is written: nothing is bound into the logger per call,
so a call that logs nothing pays nothing for it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from rerank_service.config.secret import Secret, redact
from rerank_service.observability.request_id import current_request_id


def _add_request_id(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """The request id of the call being served, unless the line names one itself."""
    request_id = current_request_id()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


class _RedactSecrets:
    """Mask any configured secret found in the rendered line.

    It runs once on the finished line rather than on each field: one substring test
    per secret, which on a line with no secret (every line, if the code is right)
    is all it costs.
    """

    def __init__(self, secrets: list[Secret]) -> None:
        self._secrets = [s for s in secrets if s.reveal()]

    def __call__(self, logger: WrappedLogger, method: str, line: Any) -> Any:
        return redact(line, self._secrets) if self._secrets and isinstance(line, str) else line


def _json_line(event: EventDict, **_: Any) -> str:
    # orjson: several times faster than json.dumps; default=str as JSONRenderer does.
    return orjson.dumps(event, default=str).decode()


def configure_logging(
    log_format: str = "auto",
    level: str = "info",
    secrets: list[Secret] | None = None,
    stream: TextIO | None = None,
    cache_loggers: bool = False,
) -> None:
    """Configure structlog for the process. `log_format` is auto, json or console.

    `cache_loggers` binds each module's logger once (saves ~10 µs a line); a process
    that configures logging once (the server) wants it, tests that reconfigure do not.
    """
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if log_format == "console"
        else structlog.processors.JSONRenderer(serializer=_json_line)
    )
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
        _RedactSecrets(secrets or []),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=cache_loggers,
    )


def get_logger(name: str) -> Any:
    """A structlog logger tagged with the module name."""
    return structlog.get_logger(logger_name=name)
