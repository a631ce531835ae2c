"""A route: the model name a caller sends, and the deployments that serve it, in order of choice."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import DeploymentInfo, LongDocuments, ModelInfo
from rerank_service.core.retry_budget import RetryBudget
from rerank_service.core.token_window import TokenWindow
from rerank_service.routing.deployment import Deployment


@dataclass(eq=False)
class Member:
    """A deployment's place in one route."""

    deployment: Deployment
    model: str  # the name the deployment knows the model by
    priority: int = 0  # lowest first; higher numbers are fallbacks
    weight: int = 1  # share among members of the same priority


@dataclass(eq=False)
class Route:
    name: str
    members: list[Member]
    budget: RetryBudget = field(default_factory=RetryBudget)
    cache: bool = True  # False: the route's scores are never cached (its `cache: off`)
    # Its long-document defaults (`long_documents:`, `max_tokens_per_doc:`), for a call that sets none.
    long_documents: LongDocuments = LongDocuments.TRUNCATE
    max_tokens_per_doc: int | None = None
    _rng: random.Random = field(default_factory=random.Random)

    def pick(self, tried: set[Deployment]) -> Member | None:
        """The next member to call, or None when every one was tried.

        A down deployment whose probe is due goes first (that is how it comes back); then
        the healthy members of the lowest priority that has any; then, when every one is
        ejected, the ejected ones (panic mode: trying beats refusing); then one that will
        refuse at once, whose refusal tells the caller when to come back.
        """
        left = [member for member in self.members if member.deployment not in tried]
        if not left:
            return None
        for member in left:
            if member.deployment.probe_due:
                return member
        healthy = [member for member in left if member.deployment.usable]
        candidates = healthy or [member for member in left if not member.deployment.refuses_now]
        if not candidates:
            # Each would refuse: the one back soonest, whose refusal's RetryInfo says when the
            # route serves again (not the longest cool-down, of the lowest priority).
            return min(left, key=lambda member: (_back_in(member), member.priority))
        top = min(member.priority for member in candidates)
        tier = [member for member in candidates if member.priority == top]
        if len(tier) == 1:
            return tier[0]
        # Power of two choices over the weights: two draws by weight; the call moves to the
        # second when the first holds more calls beyond its weight's share of those in flight.
        first, second = self._rng.choices(tier, weights=[member.weight for member in tier], k=2)
        if first is second:
            return first
        over = _more_over_share(first, second, tier)
        # By a whole call or more: always. By part of one, with that chance: a comparison of
        # calls per unit of weight would do it always, and at a few calls in flight the heavier
        # one nearly always holds one and the lighter none, which would win far beyond its
        # weight (a 99:1 canary got 2%). Equal weights differ by whole calls: the less loaded wins.
        if over >= 1 or (over > 0 and self._rng.random() < over):
            return second
        return first

    def model_info(self) -> ModelInfo:
        """What ListModels says of the route: the limits every member can honour."""
        members = sorted(self.members, key=lambda member: member.priority)
        infos = [_info_of(member) for member in members]
        first = infos[0]
        return ModelInfo(
            name=self.name,
            max_documents=min(info.max_documents for info in infos),
            max_query_tokens=min(info.max_query_tokens for info in infos),
            supports_instruct=all(info.supports_instruct for info in infos),
            backend=first.backend,
            format=first.format,
            upstream_url=first.upstream_url,
            deployments=tuple(
                DeploymentInfo(
                    name=member.deployment.name,
                    backend=info.backend,
                    format=info.format,
                    upstream_url=info.upstream_url,
                    priority=member.priority,
                    weight=member.weight,
                    state=member.deployment.state,
                )
                for member, info in zip(members, infos, strict=True)
            ),
        )

    def call_limits(self) -> CallLimits:
        """A chunk may go to any member: the smallest limits of all."""
        limits = [member.deployment.backend.call_limits(member.model) for member in self.members]
        return CallLimits(
            max_documents=_smallest(limit.max_documents for limit in limits),
            max_tokens=_smallest(limit.max_tokens for limit in limits),
            max_item_tokens=min(limit.max_item_tokens for limit in limits),
            max_query_tokens=_smallest(limit.max_query_tokens for limit in limits),
            window=self._window(limits),
            long_documents=self.long_documents,
            max_tokens_per_doc=self.max_tokens_per_doc,
        )

    def _window(self, limits: list[CallLimits]) -> TokenWindow | None:
        """The window documents are cut and chunked to: that of the first member by priority
        that is ready and reports one, else of the first that reports one; None when none does.

        A local model still loading has no window yet, and its calls go to the next member:
        they are cut for it (not sent whole). The router asks again when a readiness changes.
        """
        ranked = sorted(zip(self.members, limits, strict=True), key=lambda pair: pair[0].priority)
        reported = [(member, limit.window) for member, limit in ranked if limit.window is not None]
        for member, window in reported:
            if member.deployment.backend.readiness.ready:
                return window
        return reported[0][1] if reported else None


def _back_in(member: Member) -> float:
    """Seconds until `member`'s deployment takes a call; a local model still loading says
    nothing of when (its refusal carries no RetryInfo): last."""
    health = member.deployment.health
    if not member.deployment.backend.readiness.ready or health is None:
        return math.inf
    return health.refused_for


def _more_over_share(first: Member, second: Member, tier: list[Member]) -> float:
    """How many more calls `first` holds beyond its weight's share of the tier's calls in
    flight than `second` does beyond its own (whole calls exactly when their weights are equal)."""
    total = sum(member.deployment.in_flight for member in tier)
    weights = sum(member.weight for member in tier)
    held = first.deployment.in_flight - second.deployment.in_flight
    return held - total * (first.weight - second.weight) / weights


def _smallest(values: Iterable[int | None]) -> int | None:
    """The tightest limit; None (no limit) only when no member has one."""
    return min((value for value in values if value is not None), default=None)


def _info_of(member: Member) -> ModelInfo:
    for info in member.deployment.backend.models():
        if info.name == member.model:
            return info
    raise LookupError(f"deployment {member.deployment.name} does not serve {member.model}")
