"""The upstream's request id, checked before it reaches a caller.

It becomes the answer's `request_id`, the `x-request-id` trailing metadata and ErrorInfo
metadata, so it must be a short, plain token: a very long one would overflow gRPC's
metadata limit (turning a good ranking into RESOURCE_EXHAUSTED), a CR/LF would make the
metadata invalid, and an upstream or proxy that reflects the Authorization header would
hand the service's key to the caller. A bad id is dropped (the service names the call
with its own id) and the drop is logged, without the value.
"""

from __future__ import annotations

import re

from rerank_service.config.secret import Secret
from rerank_service.observability.logging import get_logger

# Request ids in the family are uuids, "rerank-<hex>", "infinity-<uuid>": far below this.
MAX_REQUEST_ID_CHARS = 128
# Visible ASCII, no spaces: what HTTP and gRPC metadata carry safely.
_PLAIN = re.compile(r"[\x21-\x7e]+")

_log = get_logger("rerank_service.upstream")


def checked_request_id(value: str | None, secrets: list[Secret]) -> str | None:
    """`value` if it is a plain, bounded id that holds no secret; else None (and a log line)."""
    if value is None:
        return None
    if len(value) > MAX_REQUEST_ID_CHARS:
        why = f"longer than {MAX_REQUEST_ID_CHARS} characters"
    elif not _PLAIN.fullmatch(value):
        why = "not plain visible ASCII"
    elif any(secret.reveal() and secret.reveal() in value for secret in secrets):
        # Whatever the secret's length: a pass-through token may be short.
        why = "it holds a credential"
    else:
        return value
    _log.warning("upstream request id dropped", why=why, length=len(value))
    return None
