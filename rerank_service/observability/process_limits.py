"""The process's open-file limit: raised at start, and what happens when it runs out.

Every connection holds a file descriptor. systemd and many container runtimes start a
process with a soft limit of 1024 and a much higher hard one: the service raises the
soft limit to the hard one at start (any process may) and logs both once.

If descriptors still run out, asyncio's accept fails (EMFILE, ENFILE) and, by default,
reports each failure as a traceback through the loop's exception handler, up to the
listen backlog's length per wake-up: megabytes a second. `log_accept_errors_sparingly`
turns them into one line per interval that says how many it stands for.

A port the process cannot open at all (taken, or not this machine's address) is named by
`cannot_listen`, one way for one process and for a supervisor.
"""

from __future__ import annotations

import asyncio
import os
import resource
from dataclasses import dataclass
from typing import Any

from rerank_service.observability.logging import CALLER_LOG_INTERVAL, RateLimit, get_logger

_log = get_logger("rerank_service.process_limits")

# What asyncio's BaseSelectorEventLoop._accept_connection reports when accept() fails for
# want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM); it retries a second later.
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"


@dataclass(frozen=True, slots=True)
class FileLimit:
    """The open-file limit after `raise_file_limit`, and the soft one it found."""

    soft: int
    hard: int
    raised_from: int

    def fields(self) -> dict[str, int | str]:
        """As the `listening` log line shows it."""
        return {"soft": _shown(self.soft), "hard": _shown(self.hard), "raised_from": _shown(self.raised_from)}


def raise_file_limit() -> FileLimit:
    """Raise the soft RLIMIT_NOFILE to the hard one. Said once the server listens (its
    `listening` line): a refusal of the configuration before that stays one clear line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # a sandbox that refuses: keep the limit as it is
            _log.warning("file limit not raised", soft=soft, hard=hard, error=str(exc))
    return FileLimit(soft, hard, before)


def file_limit() -> int | None:
    """The soft open-file limit now; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def _shown(limit: int) -> int | str:
    return "unlimited" if limit == resource.RLIM_INFINITY else limit


def log_accept_errors_sparingly(
    loop: asyncio.AbstractEventLoop, interval: float = CALLER_LOG_INTERVAL
) -> None:
    """Make `loop` log failed accepts once per `interval` (with the count left out) instead
    of a traceback each; every other report goes to the handler it had."""
    previous = loop.get_exception_handler()
    if getattr(previous, "sparing_accept_errors", False):
        return  # installed already on this loop
    limit = RateLimit(interval)

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_OUT_OF_RESOURCES:
            if previous is None:
                loop.default_exception_handler(context)
            else:
                previous(loop, context)
            return
        left_out = limit.allow(ACCEPT_OUT_OF_RESOURCES)
        if left_out is None:
            return
        error = context.get("exception")
        _log.error(
            "accept failed",
            error=str(error) if error is not None else None,
            left_out=left_out,
            file_limit=file_limit(),
            why="the process is out of file descriptors (or memory): new connections wait in the "
            "listen queue; raise the open-file limit or lower the connection caps",
        )

    handle.sparing_accept_errors = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handle)


def cannot_listen(setting: str, host: str, port: int, error: Exception) -> str:
    """Why `setting`'s port could not be opened, in one line naming the setting."""
    return f"{setting} {port}: cannot listen on {host}:{port} ({_reason(error)})"


def _reason(error: Exception) -> str:
    """The reason alone ("Address already in use"): asyncio's message repeats the address."""
    errno = getattr(error, "errno", None)
    if isinstance(errno, int) and errno > 0:  # a resolver's errors are negative: their text says more
        return os.strerror(errno)
    return getattr(error, "strerror", None) or str(error)
