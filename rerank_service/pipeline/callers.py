"""Who a call comes from: the caller its bearer key or its client certificate names.

A key is looked up by its SHA-256 (the keys themselves are never kept here, and a
`key_sha256` of the file is such a digest already); a client certificate by its URI SANs
(a SPIFFE ID), or its subject CN when it has none; a certificate whose identity holds a
control character, or that names two callers, is refused. Keys of `--api-keys` are
anonymous callers named `key-` and 8 hex digits of their SHA-256; without any key
configured every call is `anonymous`, or, in pass-through mode, named after the token it
brings so what each upstream key used is still told apart.

The directory is one immutable snapshot swapped whole by `update` (a reload, SIGHUP), so
a call in flight keeps the caller it was identified as.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from rerank_service.config.callers import ANONYMOUS, CallerConfig, CallerLimits, anonymous_name, key_digest
from rerank_service.config.secret import Secret
from rerank_service.config.server import CallersConfig
from rerank_service.core.domain import ServiceError, echo, listed


@dataclass(frozen=True, slots=True)
class Caller:
    """A caller as a call carries it: its name, the models it may call (None: every one)
    and its limits (None: none)."""

    name: str
    models: frozenset[str] | None = None
    limits: CallerLimits | None = None
    # One of the callers: section (their names are a bounded set; others are made per key).
    configured: bool = False
    # Named after a token passed upstream (pass-through): any token makes one, so their
    # number has no bound (--api-keys' callers and `anonymous` are the configuration's).
    per_token: bool = False

    @property
    def held_to_share(self) -> bool:
        """Whether its calls are held to the fair share of the slots: one with a concurrent
        limit of its own is held to that instead (its slots still count as another caller
        calling)."""
        return self.limits is None or self.limits.concurrent is None

    def check_model(self, model: str) -> None:
        """PERMISSION_DENIED unless this caller may call `model`."""
        if self.models is not None and model not in self.models:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller {self.name!r} may not call model {echo(model)!r}; it may call: "
                + listed(sorted(self.models)),
                reason="MODEL_NOT_ALLOWED",
                metadata={"caller": self.name, "model": echo(model)},
            )

    def may_call(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def limited(self) -> bool:
        return self.limits is not None


ANONYMOUS_CALLER = Caller(ANONYMOUS)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    by_digest: dict[bytes, Caller]
    by_identity: dict[str, Caller]
    by_name: dict[str, Caller]

    @property
    def enabled(self) -> bool:
        return bool(self.by_digest or self.by_identity)


class CallerDirectory:
    """Identifies callers; refuses nobody itself (`Pipeline.authenticate` does) but a
    client certificate that names more than one caller."""

    def __init__(
        self,
        callers: Sequence[CallerConfig] = (),
        api_keys: Sequence[Secret] = (),
        *,
        pass_through: bool = False,
    ) -> None:
        self._anonymous = {key_digest(key.reveal()): Caller(anonymous_name(key.reveal())) for key in api_keys}
        self._pass_through = pass_through
        self._snapshot = self._build(callers)

    @classmethod
    def from_config(cls, config: CallersConfig) -> CallerDirectory:
        return cls(config.callers, config.api_keys, pass_through=config.pass_through)

    def update(self, callers: Sequence[CallerConfig]) -> None:
        """Serve these callers from the next call on (the `--api-keys` stay as started)."""
        self._snapshot = self._build(callers)

    def _build(self, callers: Iterable[CallerConfig]) -> _Snapshot:
        by_digest = dict(self._anonymous)
        by_identity: dict[str, Caller] = {}
        by_name: dict[str, Caller] = {}
        for config in callers:
            caller = Caller(config.name, config.models, config.limits, configured=True)
            by_digest.update(dict.fromkeys(config.key_digests, caller))
            by_identity.update(dict.fromkeys(config.tls_identities, caller))
            by_name[config.name] = caller
        return _Snapshot(by_digest, by_identity, by_name)

    def limits_now(self, name: str) -> CallerLimits | None:
        """The configured caller `name`'s limits as they are now (a reload may have changed
        them since a call of its was admitted); None when it has none, or is gone."""
        caller = self._snapshot.by_name.get(name)
        return None if caller is None else caller.limits

    @property
    def enabled(self) -> bool:
        """Whether a call must name a known caller (any key or identity is configured)."""
        return self._snapshot.enabled

    @property
    def reads_tokens(self) -> bool:
        """Whether a call's bearer token says who it is (keys configured, or pass-through)."""
        return self._pass_through or bool(self._snapshot.by_digest)

    @property
    def identifies_peers(self) -> bool:
        """Whether some caller is known by its client certificate."""
        return bool(self._snapshot.by_identity)

    @property
    def callers(self) -> list[Caller]:
        """The configured callers (each once)."""
        snapshot = self._snapshot
        found = {id(c): c for c in (*snapshot.by_digest.values(), *snapshot.by_identity.values())}
        return [caller for caller in found.values() if caller.configured]

    def accepts(self, token: Secret | None) -> bool:
        """Whether `token` is a known key (the gRPC edge's check before a call is read)."""
        return token is not None and key_digest(token.reveal()) in self._snapshot.by_digest

    def identify(self, token: Secret | None, peer_identities: Sequence[str] = ()) -> Caller | None:
        """The caller of a call with this bearer token and these certificate identities;
        None when callers are configured and neither names one. An accepted key decides;
        else the certificate, UNAUTHENTICATED when its identities name two callers."""
        snapshot = self._snapshot
        if not snapshot.enabled:
            if self._pass_through and token is not None:
                return Caller(anonymous_name(token.reveal()), per_token=True)
            return ANONYMOUS_CALLER
        if token is not None:
            found = snapshot.by_digest.get(key_digest(token.reveal()))
            if found is not None:
                return found
        found, named_by = None, ""
        for identity in peer_identities:
            caller = snapshot.by_identity.get(identity)
            if caller is None or caller is found:
                continue  # an identity of no caller's (or of the one found) is no second caller
            if found is not None:
                # Taking the first SAN's caller would make the SANs' order the certificate's
                # authority: whoever the CA let write them chooses among the callers.
                raise ServiceError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"the client certificate names more than one caller ({echo(named_by)!r} and "
                    f"{echo(identity)!r} are two callers' identities): a certificate must name one",
                )
            found, named_by = caller, identity
        return found


# C0, DEL and C1: no identity holds one, and a NUL is where C code (grpc's auth context)
# cuts a string, so that `indexer\0.evil` would read as `indexer`.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def certificate_identities(uris: Sequence[str], common_name: str | None) -> list[str]:
    """A client certificate's identities, in the order they are matched: its URI SANs (a
    SPIFFE ID), or, failing those, its subject CN. A CN written as a URI is none: a URI
    identity is a URI SAN's alone (a CA that signs names its clients choose could
    otherwise sign any workload's SPIFFE ID as a CN). UNAUTHENTICATED when one of them
    holds a control character (the message does not repeat it)."""
    identities: list[str] = list(uris)
    if not uris and common_name and "://" not in common_name:
        identities = [common_name]
    if any(_CONTROL_CHARACTER.search(identity) for identity in identities):
        what = "a URI SAN" if uris else "its subject CN"
        raise ServiceError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"the client certificate's identity ({what}) holds a control character: it names no caller",
        )
    return identities
