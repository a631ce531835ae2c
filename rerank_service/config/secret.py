"""Secret values (API keys) that never show themselves in logs, reprs or errors."""

from __future__ import annotations

import functools
import hmac
import re
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit

from rerank_service.config.file_trust import warn_if_key_exposed

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


# A secret of this length or more is masked wherever it occurs, inside a word too; a
# shorter one (a test key, a caller's short pass-through token) only where it stands as a
# token of its own, not next to a letter or digit. Masking every occurrence of a short
# value would destroy the messages it must keep readable (a 1-letter key would mask every
# "k" of every line), while an upstream or an error that echoes a credential puts it
# between quotes, spaces, "=" or ":", which a whole-token match catches at any length.
WHOLE_WORD_BELOW = 8
# A store's or proxy's password, or a collector's credential, shorter than this is masked
# nowhere: no real secret is, and masking it would mask that number or word in every line
# (a password "2" made `"documents": 2` a mask, and the line no JSON). Longer ones below
# WHOLE_WORD_BELOW are masked where they stand alone, as short keys are.
SHORTEST_SECRET = 4


def redact(text: str, secrets: list[Secret]) -> str:
    """Replace each secret in `text` with a mask: any occurrence of a long one, every
    stand-alone occurrence of a short one (see WHOLE_WORD_BELOW)."""
    for secret in secrets:
        value = secret.reveal()
        if not value or value not in text:  # the usual case: one substring test
            continue
        if len(value) >= WHOLE_WORD_BELOW:
            text = text.replace(value, _MASK)
        else:
            text = _standing_alone(value).sub(_MASK, text)
    return text


@functools.lru_cache(maxsize=256)
def _standing_alone(value: str) -> re.Pattern[str]:
    """`value` not preceded or followed by a letter or digit ([^\\W_]: a word character but `_`)."""
    return re.compile(rf"(?<![^\W_]){re.escape(value)}(?![^\W_])")


class UnreadableKeyFile(ValueError):
    """A key file that cannot be read; the message is `PATH: why` (never its content, and
    the path only as `file_named` shows it)."""


def read_key_file(path: Path | str) -> str:
    """The text of a file holding keys, or UnreadableKeyFile saying why not; a file others
    may read, or reached through a symlink, is used with a warning (config/file_trust.py).
    Give the path as the user wrote it where there is that text: an error names it by that
    text (file_named), and a Path has already dropped a leading `./`."""
    file = Path(path)
    try:
        # utf-8-sig: a byte-order mark some editors write would become part of the first key.
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL byte in the path
        if isinstance(exc, OSError):
            reason = exc.strerror or "cannot read it"
        elif isinstance(exc, UnicodeDecodeError):
            reason = "not UTF-8 text"
        else:
            reason = "not a file path (it holds a NUL byte)"
        raise UnreadableKeyFile(f"{file_named(path)}: {reason}") from None
    warn_if_key_exposed(file, "key file")
    return text


def read_keys(path: Path | str) -> list[str]:
    """The keys of a file holding several, one a line (blank lines and lines starting with #
    left out), or UnreadableKeyFile saying why not. A key holds no space: a line that does
    is refused, as a comment after a key would silently become part of it."""
    keys: list[str] = []
    for number, line in enumerate(read_key_file(path).splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if len(key.split()) > 1:
            raise UnreadableKeyFile(
                f"{file_named(path)}: line {number} holds a space: write one key a line, "
                "and a comment on a line of its own starting with #"
            )
        keys.append(key)
    return keys


def key_fault(key: str) -> str | None:
    """What makes `key` (one key, read whole from a variable or a file) unusable as a
    credential, or None: a line break, a space or a control character, which no HTTP client
    sends in a header (each call would fail INTERNAL, naming nothing). The words say where it
    is wrong, never the key."""
    if any(char in "\r\n" for char in key):
        return "holds more than one line: write the key alone, with no comment"
    if any(char.isspace() for char in key):
        return "holds a space: write the key alone, with no comment"
    if not key.isprintable():
        return "holds a control character"
    return None


def file_named(path: Path | str) -> str:
    """A key file's path as an error may say it: only when it reads as a path, since a key
    pasted where its file goes must not be repeated. ./ ../ ~/ start no key ('.' and '~' are
    no base64 character), but '/' starts one base64 key in 64: an absolute path is repeated
    only when its first directory exists (/run/..., /etc/...), which a key's first part all
    but never names. Pass the text the user wrote: str(Path("./keys")) is "keys", which is
    not repeated."""
    text = str(path)
    if "\0" in text:
        return "(a relative path, not repeated)"
    if text.startswith(("./", "../")) or (text.startswith("~") and "/" in text):
        return text
    if text.startswith("/"):
        return text if _first_directory_exists(text) else "(an absolute path that may be a key, not repeated)"
    return "(a relative path, not repeated)"


def _first_directory_exists(path: str) -> bool:
    first, slash, _ = path[1:].partition("/")
    if not first or not slash:  # a file of / itself: no path of a key file, and a key may read so
        return False
    try:
        return Path("/", first).is_dir()
    except (OSError, ValueError):  # a name too long for the file system: a key's, not a directory's
        return False


def variable_named(name: str) -> str:
    """A key variable's name as an error may say it: only when it looks like a variable's
    name (upper case), since a key pasted where the name goes must not be repeated."""
    return name if name.isupper() else "a variable"


def url_named(url: str) -> str:
    """A URL as an error may say it: its user and password, everything between the scheme's
    `://` (or the start) and the last `@`, masked. Read from the text, not through urlsplit:
    an unencoded `/`, `?` or `#` in a password ends the host part there, so urlsplit finds
    no password at all and the whole URL would be repeated."""
    at = url.rfind("@")
    if at < 0:
        return url
    scheme_end = url.find("://")
    start = scheme_end + 3 if 0 <= scheme_end < at else 0
    return f"{url[:start]}***{url[at:]}"


def url_secrets(url: str | None) -> list[Secret]:
    """The password of a URL that carries one, as written and percent-decoded, for the log's
    masking. Not the user: a name (default, rerank-service) masked in every line would mask
    words of the service's own lines."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        passwords = [parts.password or ""]
    except ValueError:  # not a URL urlsplit reads (an unbalanced [ of an IPv6 host)
        return []
    # A Redis URL's query may hold a TLS key's passphrase (ssl_password).
    passwords += [value for name, value in parse_qsl(parts.query) if name == "ssl_password"]
    return [
        Secret(each)
        for password in passwords
        for each in dict.fromkeys((password, unquote(password)))
        if maskable(each)
    ]


def maskable(value: str) -> bool:
    """Whether a password or credential is masked in the log: not one shorter than
    SHORTEST_SECRET, nor a short one that reads as a JSON number or literal (a password
    `123456` would mask that number where it stands alone, and leave the line no JSON)."""
    if len(value) >= WHOLE_WORD_BELOW:
        return True
    return len(value) >= SHORTEST_SECRET and not value.isdigit() and value not in ("true", "false", "null")
