"""structlog set-up: JSON lines by default, a readable console format on a terminal.

Every event passes through a redaction step that masks the configured secrets, a
second line of defence behind never putting them into events at all.

Every line logged while a call is served carries that call's `request_id`, read from
request_id.py when the line is written: nothing is bound into the logger per call,
so a call that logs nothing pays nothing for it.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, TextIO, cast

import orjson
import structlog
from aiohttp import http_exceptions
from structlog.typing import EventDict, Processor, WrappedLogger

from rerank_service.config.secret import Secret, redact
from rerank_service.observability.request_id import current_request_id
from rerank_service.observability.tracing import current as current_span


def _add_request_id(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """The request id of the call being served, unless the line names one itself, and with
    tracing on its trace and span (a log line leads to its trace, and back)."""
    request_id = current_request_id()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    span = current_span()
    if span is not None:
        event.setdefault("trace_id", span.trace_id)
        event.setdefault("span_id", span.span_id)
    return event


class _RedactSecrets:
    """Mask any configured secret found in the rendered line.

    It runs once on the finished line rather than on each field: one substring test
    per secret, which on a line with no secret (every line, if the code is right)
    is all it costs.
    """

    def __init__(self, secrets: list[Secret]) -> None:
        self._secrets: list[Secret] = []
        self.add(secrets)

    def add(self, secrets: Iterable[Secret]) -> None:
        """Mask these too (a key already masked is not added twice)."""
        known = {secret.reveal() for secret in self._secrets}
        for secret in secrets:
            value = secret.reveal()
            if value and value not in known:
                self._secrets.append(secret)
                known.add(value)

    def __call__(self, logger: WrappedLogger, method: str, line: Any) -> Any:
        return redact(line, self._secrets) if self._secrets and isinstance(line, str) else line


# The masking of the logging configured last: a reload adds the keys it reads (mask_also).
_redaction: _RedactSecrets | None = None


def mask_also(secrets: Iterable[Secret]) -> None:
    """Mask these secrets too in every line from now on (the keys a reload read); those
    masked so far stay masked, since lines about retired deployments may still come."""
    if _redaction is not None:
        _redaction.add(secrets)


def _json_line(event: EventDict, **_: Any) -> str:
    # orjson: several times faster than json.dumps; default=str as JSONRenderer does.
    try:
        return orjson.dumps(event, default=str).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        return _stdlib_json_line(event)


# A lone surrogate: what Python holds for a byte of a path or argument that is not UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _stdlib_json_line(event: EventDict) -> str:
    """The line of an event orjson refuses: an int past 64 bits, a str holding a lone
    surrogate (a --config path that is not UTF-8), nesting past 254 deep. A log call must
    never raise: the line was lost, and what its caller did after it skipped (the refused
    reload's line, an asyncio "Task exception was never retrieved" in its place)."""
    try:
        text = json.dumps(event, default=str, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):  # a key no str, a cycle: each field as its str
        text = json.dumps(
            {str(key): str(value) for key, value in event.items()}, ensure_ascii=False, separators=(",", ":")
        )
    # A lone surrogate is no UTF-8 (the stream would refuse it) and no strict JSON parser takes
    # its \u escape: it is written as that escape's text instead (c\udcff.yaml).
    return _SURROGATE.sub(lambda found: f"\\\\u{ord(found[0]):04x}", text)


def configure_logging(
    log_format: str = "auto",
    level: str = "info",
    secrets: list[Secret] | None = None,
    stream: TextIO | None = None,
    cache_loggers: bool = False,
    fields: Mapping[str, Any] | None = None,
) -> None:
    """Configure structlog for the process. `log_format` is auto, json or console.

    `cache_loggers` binds each module's logger once (saves ~10 µs a line); a process
    that configures logging once (the server) wants it, tests that reconfigure do not.
    `fields` are on every line the process writes, whatever thread writes it (a worker's
    `worker` and `pid`: grpc calls some of the service's code on threads of its own, where
    context variables bound on the event loop's thread are not set).
    """
    global _redaction
    _redaction = redaction = _RedactSecrets(secrets or [])
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    lossy = _LossyStream(stream, _lost_note(log_format, fields or {}))
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if log_format == "console"
        else structlog.processors.JSONRenderer(serializer=_json_line)
    )
    processors: list[Processor] = [
        *([_with_fields(dict(fields))] if fields else []),
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
        redaction,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, lossy)),
        cache_logger_on_first_use=cache_loggers,
    )
    route_library_logs()


_LOST_EVENT = "log: lines were lost, the stream could not be written"


def _lost_note(log_format: str, fields: Mapping[str, Any]) -> Callable[[int], str]:
    """The line that says `lost` lines were lost, as the log's renderer would write it."""

    def note(lost: int) -> str:
        event = {
            **fields,
            "logger_name": __name__,
            "lost": lost,
            "event": _LOST_EVENT,
            "level": "warning",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
        }
        if log_format == "console":
            return f"{event['timestamp']} [warning  ] {_LOST_EVENT} lost={lost}\n"
        return _json_line(event) + "\n"

    return note


class _LossyStream:
    """The log's stream, whose writes never raise: a line that cannot be written (a full
    disk, a log shipper's pipe closed) is lost, never the call that logged it. structlog
    writes on the caller's path, and an error there failed an answered call with UNKNOWN
    and skipped what came after the line (its caller's limits settled, its usage line).
    The lines lost are counted and said by the first line written again."""

    def __init__(self, stream: TextIO, note: Callable[[int], str]) -> None:
        self._stream = stream
        self._note = note  # the line that says how many were lost, rendered
        self.lost = 0

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def write(self, text: str) -> None:
        try:
            self._stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed
            self.lost += 1

    def flush(self) -> None:
        # structlog flushes after each line: one that does not go out is counted lost here.
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self.lost += 1
            return
        if self.lost:  # written again: said once, written here (structlog holds its lock)
            lost, self.lost = self.lost, 0
            try:
                self._stream.write(self._note(lost))
                self._stream.flush()
            except (OSError, ValueError):
                self.lost += lost


def _with_fields(fields: dict[str, Any]) -> Processor:
    def add(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in fields.items():
            event.setdefault(key, value)
        return event

    return add


def get_logger(name: str) -> Any:
    """A structlog logger tagged with the module name."""
    return structlog.get_logger(logger_name=name)


# The libraries whose own lines a caller or an outage can cause: aiohttp's on each
# malformed HTTP request, asyncio's on each failed accept or lost task, OpenTelemetry's
# on each export retry while the trace collector is down. Left alone they write text (or
# multi-line tracebacks) to stderr (Python's last-resort handler), among the JSON lines.
LIBRARY_LOGGERS = ("aiohttp", "asyncio", "opentelemetry")
# Seconds: a line a caller can cause (a library's, a refusal) is written at most once per
# kind in each interval, and the next one says how many were left out (RateLimit).
CALLER_LOG_INTERVAL = 10.0


class RateLimit:
    """At most one line per key in each interval; the line let through next says how many
    were left out meanwhile."""

    _MAX_KEYS = 1024  # keys come from library code, but a bound costs nothing

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._next: dict[Hashable, float] = {}
        self._left_out: dict[Hashable, int] = {}

    def allow(self, key: Hashable) -> int | None:
        """None: leave this line out; otherwise the lines of `key` left out since the last one."""
        now = self._clock()
        if now < self._next.get(key, now):
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return None
        if len(self._next) >= self._MAX_KEYS and key not in self._next:
            self._next.clear()
        self._next[key] = now + self._interval
        return self._left_out.pop(key, 0)


# Loggers whose messages' arguments are never repeated, and what is said in their place:
# OpenTelemetry's header parser quotes the malformed entry of the exporter's headers
# variable, a credential as often as not ("authorization: Bearer ..." for "authorization=...").
_ARGUMENTS_NOT_REPEATED = {
    "opentelemetry.util.re": "OTEL_EXPORTER_OTLP_HEADERS or OTEL_EXPORTER_OTLP_TRACES_HEADERS is malformed",
}


class _IntoStructlog(logging.Handler):
    """A library's stdlib log record as one short structlog line: its message's first line,
    the exception's type and message and where it was raised (no traceback), rate-limited
    per kind of message."""

    def __init__(self, limit: RateLimit) -> None:
        super().__init__()
        self._limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            template = str(record.msg).partition("\n")[0][:200]
            left_out = self._limit.allow((record.name, template))
            if left_out is None:
                return
            fields: dict[str, Any] = _exception_fields(record.exc_info)
            if left_out:
                fields["left_out"] = left_out
            level = "error" if record.levelno >= logging.ERROR else "warning"
            if record.levelno < logging.WARNING:
                level = "info" if record.levelno >= logging.INFO else "debug"
            instead = _ARGUMENTS_NOT_REPEATED.get(record.name)
            if instead is not None:
                message = f"{template.replace('%s', '(not repeated)')} ({instead})"
            else:
                message = record.getMessage().partition("\n")[0][:300]
            getattr(get_logger(record.name), level)(message, **fields)
        except Exception:
            self.handleError(record)


# A bytes literal in an exception's message: aiohttp's HTTP parser quotes the line it could
# not parse as it came, and a header line may hold a caller's token that no configured key
# would mask (a key pasted with a stray CR or control byte).
_QUOTED_BYTES = re.compile(r"""(?<!\w)b(['"])(?:\\.|(?!\1).)*\1""")
# What is said of an error of aiohttp's HTTP parser instead of its message.
_MALFORMED_REQUEST = "malformed HTTP message (its text not repeated)"


def _exception_fields(exc_info: Any) -> dict[str, Any]:
    if not exc_info or exc_info[1] is None:
        return {}
    _, error, trace = exc_info
    if isinstance(error, http_exceptions.HttpProcessingError):
        # aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS, PyPy) quotes what it could not
        # read as plain text, no bytes literal: a request target's query (a token), a body's
        # query and documents. The class says what was wrong (as backends/upstream/client/
        # failures.py says of an upstream's answer).
        text = _MALFORMED_REQUEST
    else:
        text = _QUOTED_BYTES.sub("b'…'", " ".join(str(error).split()))
    fields: dict[str, Any] = {"error": f"{type(error).__name__}: {text[:300]}"}
    frames = traceback.extract_tb(trace) if trace is not None else []
    if frames:
        fields["at"] = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}"
    return fields


def route_library_logs(interval: float = CALLER_LOG_INTERVAL) -> None:
    """Send the LIBRARY_LOGGERS' log records through structlog (the chosen format,
    redaction), one short line each and at most one per kind of message per interval."""
    handler = _IntoStructlog(RateLimit(interval))
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for old in [each for each in library.handlers if isinstance(each, _IntoStructlog)]:
            library.removeHandler(old)
        library.addHandler(handler)
        library.propagate = False  # not also as text through the root or last-resort handler
