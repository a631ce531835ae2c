"""W3C Trace Context: the caller's traceparent and tracestate, checked before they go on.

They are copied into upstream HTTP headers, so anything malformed is dropped
silently rather than forwarded: a stray CR/LF would be a header-injection vector.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# W3C Trace Context, version 00: version-traceid-parentid-flags, lowercase hex only.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE_ID, _ZERO_PARENT_ID = "0" * 32, "0" * 16
# A tracestate list member: key=value, the key simple or tenant@system, the value
# printable ASCII without ',' or '=' and not ending in a space.
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
MAX_TRACESTATE_MEMBERS = 32
MAX_TRACESTATE_CHARS = 512


def trace_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, str | None]:
    """The caller's (traceparent, tracestate), each None unless it is well-formed.

    They are copied into upstream HTTP headers, so anything malformed is dropped
    silently rather than forwarded: a stray CR/LF would be a header-injection vector.
    Two traceparents are malformed; several tracestates are one list, as in HTTP.
    """
    traceparent: str | bytes | None = None
    states: list[str] = []
    for key, value in metadata or ():
        if key == "traceparent":
            if traceparent is not None:
                return None, None
            traceparent = value
        elif key == "tracestate" and isinstance(value, str):
            states.append(value)
    if not isinstance(traceparent, str) or not valid_traceparent(traceparent):
        return None, None
    return traceparent, valid_tracestate(",".join(states)) if states else None


def valid_traceparent(value: str) -> bool:
    match = _TRACEPARENT.fullmatch(value)
    return match is not None and match[1] != _ZERO_TRACE_ID and match[2] != _ZERO_PARENT_ID


def valid_tracestate(value: str) -> str | None:
    """The tracestate with empty members and optional spaces dropped, or None if malformed."""
    if len(value) > MAX_TRACESTATE_CHARS:
        return None
    members = [member for member in (part.strip(" \t") for part in value.split(",")) if member]
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    if not all(_TRACESTATE_MEMBER.fullmatch(member) for member in members):
        return None
    return ",".join(members)
