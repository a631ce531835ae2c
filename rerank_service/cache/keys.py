"""The cache's key for a pair: a digest of everything that changes its score.

A score is a function of what the answering deployment runs (its model, format, score
transform, prompt, engine...), the instruct, the query and the document. The key is a
BLAKE2b-256 digest over a length-prefixed encoding of those four, so no two different
inputs share an encoding, and the key holds no text: a 20 MB document is hashed, never
stored. The deployment's settings enter as a fingerprint, a digest of its own, so a change
of any of them (a reload that changes the model or its settings) makes its old entries
unreachable without a flush.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence

KEY_SIZE = 32  # bytes of a pair key (BLAKE2b-256)
# BLAKE2b's personalization: the encoding's version, so a change of it never reads old keys.
_PAIR_PERSON = b"rerank-pair-v1"
_FINGERPRINT_PERSON = b"rerank-deploy-v1"

FingerprintValue = str | int | float | bool | None
_PRESENT = struct.Struct(">BQ")  # a present field's marker (1) and its length, as _update writes them


def deployment_fingerprint(settings: Mapping[str, FingerprintValue] | bytes) -> bytes:
    """The digest of what a deployment runs, from the settings that change its scores (model
    id, source and revision, format, score transform, prompt template, engine,
    quantization...), or from bytes the caller encoded itself. Equal settings give equal
    fingerprints, whatever the mapping's order: two deployments of one model share entries."""
    if isinstance(settings, bytes):
        encoded = settings
    else:
        encoded = json.dumps(
            dict(settings), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
    return hashlib.blake2b(encoded, digest_size=KEY_SIZE, person=_FINGERPRINT_PERSON).digest()


def _update(digest: hashlib.blake2b, text: str | None) -> None:
    """Feed one field, length-prefixed: absent (b"\\0") differs from empty (b"\\1" + length 0).
    The text and its prefix go in separately, so a large document is not copied twice."""
    if text is None:
        digest.update(b"\0")
        return
    data = text.encode("utf-8", "surrogatepass")
    digest.update(b"\1" + len(data).to_bytes(8, "big"))
    digest.update(data)


class PairKeys:
    """The keys of one deployment's pairs: the fingerprint is hashed once, then each call's
    instruct and query once, and each document on a copy of that state."""

    __slots__ = ("_base", "fingerprint")

    def __init__(self, fingerprint: bytes) -> None:
        self.fingerprint = fingerprint
        self._base = hashlib.blake2b(digest_size=KEY_SIZE, person=_PAIR_PERSON)
        self._base.update(len(fingerprint).to_bytes(8, "big") + fingerprint)

    def keys(self, instruct: str | None, query: str, documents: Sequence[str]) -> list[bytes]:
        """Each document's key, in order. `instruct` is the effective one (the model's default
        when the caller sent none; None for a model that takes no instruct)."""
        call = self._base.copy()
        _update(call, instruct)
        _update(call, query)
        keys: list[bytes] = []
        append, copy, prefix = keys.append, call.copy, _PRESENT.pack
        for document in documents:  # _update, inlined: this loop runs once per document
            data = document.encode("utf-8", "surrogatepass")
            pair = copy()
            pair.update(prefix(1, len(data)))
            pair.update(data)
            append(pair.digest())
        return keys
