"""Bearer tokens in gRPC metadata: reading them and checking them against the keys."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rerank_service.config.secret import Secret

Metadata = Iterable[tuple[str, str | bytes]]


def bearer_token(metadata: Metadata | None) -> Secret | None:
    """The token of an `authorization: Bearer <token>` entry, if there is one."""
    for key, value in metadata or ():
        if key.lower() != "authorization" or not isinstance(value, str):
            continue
        parts = value.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip():
            return Secret(parts[1].strip())
    return None


class KeyChecker:
    """Accepts a call when its bearer token equals one of the configured keys."""

    def __init__(self, keys: Sequence[Secret]) -> None:
        self._keys = list(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def accepts(self, token: Secret | None) -> bool:
        if token is None:
            return False
        candidate = token.reveal()
        # Compare against every key, so timing does not say which one (or none) matched.
        matched = False
        for key in self._keys:
            matched |= key.matches(candidate)
        return matched
