"""Secret values (API keys) that never show themselves in logs, reprs or errors."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Final

_MASK: Final = "**********"


class Secret:
    """A string that only `reveal()` gives back; str() and repr() print a mask."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def matches(self, candidate: str) -> bool:
        """Constant-time comparison, so response timing does not leak the key."""
        return hmac.compare_digest(self._value.encode(), candidate.encode())

    def __repr__(self) -> str:
        return f"Secret({_MASK})"

    def __str__(self) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and self.matches(other._value)

    def __hash__(self) -> int:
        return hash(self._value)


# Shorter values are not masked: masking a 1-letter test key would mangle every log
# line, and masking is a second line of defence (keys are never put in logs at all).
MIN_REDACTED_LENGTH = 8


def redact(text: str, secrets: list[Secret]) -> str:
    """Replace every occurrence of any secret (of at least 8 characters) in `text` with a mask."""
    for secret in secrets:
        value = secret.reveal()
        if len(value) >= MIN_REDACTED_LENGTH:
            text = text.replace(value, _MASK)
    return text


class UnreadableKeyFile(ValueError):
    """A key file that cannot be read; the message is `PATH: why` (never its content)."""


def read_key_file(path: Path) -> str:
    """The text of a file holding keys, or UnreadableKeyFile saying why not."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise UnreadableKeyFile(f"{path}: {reason}") from None
