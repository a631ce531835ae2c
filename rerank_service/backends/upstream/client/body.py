"""An upstream response body read whole, within a size bound, gzip decoded.

The bound applies to the decoded size: a small gzip body can inflate a thousandfold (a
"gzip bomb"), so decoding stops as soon as the output would pass the bound, having
inflated at most one step past what it keeps. The wire bytes are bounded too, so a
stream that decodes to nothing cannot run on without end either.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, Iterable

# A rerank response is a few bytes per document; anything near this is broken.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# gzip framing (RFC 1952) around deflate: zlib's window bits plus 16.
_GZIP_WBITS = 16 + zlib.MAX_WBITS
# The most one inflate call produces: bounds the transient buffers next to what is kept.
_INFLATE_STEP = 256 * 1024


class ResponseTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the response is larger than {limit} bytes")
        self.limit = limit


class UndecodableBody(Exception):
    """A body its Content-Encoding does not describe: corrupt, cut short, or a coding not asked for."""


def content_coding(raw_headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The Content-Encoding header's value, if any, from the raw (bytes) headers."""
    for name, value in raw_headers:
        if len(name) == 16 and name.lower() == b"content-encoding":
            return value
    return None


async def read_body(
    chunks: AsyncIterable[bytes], content_encoding: bytes | None, limit: int = MAX_RESPONSE_BYTES
) -> bytes:
    """The whole body, decoded; ResponseTooLarge past `limit`, UndecodableBody if it is broken."""
    if content_encoding is not None:
        coding = content_encoding.strip().lower()
        if coding in (b"gzip", b"x-gzip"):  # RFC 9110: x-gzip is gzip
            return await _read_gzip(chunks, limit)
        if coding != b"identity":
            # Only gzip is advertised (exchange.py); anything else is the upstream's mistake.
            raise UndecodableBody(f"the body has {_coding_named(coding)}, which was not asked for")
    # The common path: kept as the plain loop it has always been.
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)


# The content-codings IANA registers (gzip and identity are read): the only values an error
# names, since any other could be a credential.
_REGISTERED_CODINGS = frozenset(
    {
        b"aes128gcm",
        b"br",
        b"compress",
        b"dcb",
        b"dcz",
        b"deflate",
        b"exi",
        b"pack200-gzip",
        b"x-compress",
        b"zstd",
    }
)


def _coding_named(coding: bytes) -> str:
    """An unknown Content-Encoding (lowercased) as an error may say it: quoted only when it
    is a registered content-coding, since a reflecting upstream or proxy may put the
    Authorization header there, and the error goes to the caller and the access log (where
    a lowercased key escapes the masking, and a caller's pass-through token is no
    configured key)."""
    if coding in _REGISTERED_CODINGS:
        return f"content-encoding {coding.decode('ascii')!r}"
    return "a content-encoding that is no registered content-coding (not repeated)"


async def _read_gzip(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    inflater = _Inflater(limit)
    wire = 0
    async for chunk in chunks:
        wire += len(chunk)
        if wire > limit:
            raise ResponseTooLarge(limit)
        inflater.feed(chunk)
    return inflater.finish(empty=wire == 0)


class _Inflater:
    """gzip decoding into a list of parts, never keeping (or making) more than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._left = limit
        self._parts: list[bytes] = []
        self._zlib = zlib.decompressobj(_GZIP_WBITS)

    def feed(self, data: bytes) -> None:
        try:
            self._inflate(data)
        except zlib.error as exc:
            raise UndecodableBody(f"the gzip body is corrupt ({exc})") from None

    def _inflate(self, data: bytes) -> None:
        while True:
            if self._zlib.eof:
                # RFC 1952 allows several gzip members back to back: decode the next one.
                data = self._zlib.unused_data + data
                if not data:
                    return
                self._zlib = zlib.decompressobj(_GZIP_WBITS)
            # One byte past what is left is enough to know the body is too large.
            step = min(self._left + 1, _INFLATE_STEP)
            out = self._zlib.decompress(data, step)
            if len(out) > self._left:
                raise ResponseTooLarge(self._limit)
            self._left -= len(out)
            if out:
                self._parts.append(out)
            data = self._zlib.unconsumed_tail
            # A full step may leave output inside zlib: go round again until it comes short.
            if not data and len(out) < step and not self._zlib.eof:
                return

    def finish(self, empty: bool) -> bytes:
        if not self._zlib.eof and not empty:  # an empty body means no content, gzip or not
            raise UndecodableBody("the gzip body ends before its end of stream")
        return b"".join(self._parts)
