"""The request id of the call being served.

The call pipeline (pipeline/call.py, for every call and each RerankStream item) makes its
id and binds it here for the call's task and the tasks it starts; it is the only writer.
Everything else only reads it: log lines carry it, refusals name it.
"""

from __future__ import annotations

import contextvars
import os

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("rerank_request_id", default=None)


def new_request_id() -> str:
    """32 random hex digits, the shape of uuid4().hex, at a third of its cost."""
    return os.urandom(16).hex()


def current_request_id() -> str | None:
    """The id of the call being served, or None outside one (start-up, the batch worker)."""
    return _current.get()


def bind_request_id(request_id: str) -> contextvars.Token[str | None]:
    """Make `request_id` the current call's id for this task and the tasks it starts."""
    return _current.set(request_id)


def unbind_request_id(token: contextvars.Token[str | None]) -> None:
    _current.reset(token)
