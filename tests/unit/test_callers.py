"""The callers section: what it accepts, the one-line errors it gives, and the callers the
pipeline identifies from it (keys by SHA-256, certificate identities, anonymous keys)."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc
import pytest

from rerank_service.config import ConfigError, Settings, load_settings
from rerank_service.config.callers import (
    BucketLimit,
    CallerConfig,
    CallerEntry,
    CallerKeyError,
    CallerLimits,
    anonymous_name,
    caller_configs,
    key_digest,
    with_caller_keys,
)
from rerank_service.config.reference import CALLERS_EXAMPLE
from rerank_service.config.secret import Secret
from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import (
    BackendResult,
    CallContext,
    ModelInfo,
    RerankOutcome,
    RerankRequest,
    ScoredDocument,
    ServiceError,
    replaced,
)
from rerank_service.core.engine import Prepared, RerankEngine, Validated
from rerank_service.pipeline.admission import Admission
from rerank_service.pipeline.buckets import LocalBuckets
from rerank_service.pipeline.call import Call, Pipeline
from rerank_service.pipeline.callers import ANONYMOUS_CALLER, Caller, CallerDirectory, certificate_identities
from rerank_service.pipeline.limits import estimated_tokens

SEARCH_KEY = "sk-search-0123456789"
ADS_KEY = "sk-ads-0123456789"
SHA = hashlib.sha256(b"sk-hashed-key").hexdigest()


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "rerank.yaml"
    # The models the callers here name, served (a caller naming a model nothing serves is refused).
    served = "local_models: {qwen3-rerank: bundled, gte-rerank-v2: bundled}\n"
    path.write_text("backend: local\n" + served + text, encoding="utf-8")
    return load_settings({"config": str(path)}, env or {})


def refusal(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, env)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_documented_example_loads(tmp_path: Path) -> None:
    settings = load(tmp_path, CALLERS_EXAMPLE, {"SEARCH_API_KEY": SEARCH_KEY})

    (search,) = caller_configs(settings.callers)
    assert search.name == "search"
    assert search.key_digests == {key_digest(SEARCH_KEY)}
    assert search.models == frozenset({"qwen3-rerank"})
    assert search.limits is not None
    assert search.limits.requests is not None
    assert search.limits.requests.burst == 600  # one minute's worth by default
    assert Secret(SEARCH_KEY) in settings.secrets()  # redacted from every log line


def test_keys_from_variables_files_and_hashes_and_a_burst(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# the ads team\n{ADS_KEY}\n", encoding="utf-8")
    keys.chmod(0o600)
    settings = load(
        tmp_path,
        f"""callers:
  - name: ads
    credentials: [{{key_file: {keys}}}, {{key_sha256: {SHA.upper()}}}]
    limits: {{tokens_per_minute: 1000, burst: {{tokens: 5000}}, concurrent: 3}}
""",
    )

    (ads,) = caller_configs(settings.callers)
    assert ads.key_digests == {key_digest(ADS_KEY), key_digest("sk-hashed-key")}
    assert ads.models is None  # every model
    assert ads.limits is not None
    assert ads.limits.tokens is not None
    assert (ads.limits.tokens.per_minute, ads.limits.tokens.burst, ads.limits.concurrent) == (1000, 5000, 3)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            "  - name: a\n    credentials: [{key_env: A}]\n  - name: b\n    credentials: [{key_env: B}]\n",
            "callers[1].credentials[0] holds the same key as callers[0].credentials[0]",
        ),
        (
            f"  - name: a\n    credentials: [{{key_sha256: {SHA}}}]\n"
            f"  - name: b\n    credentials: [{{key_sha256: {SHA}}}]\n",
            "callers give one key to two callers (callers[0].credentials[0].key_sha256 and "
            "callers[1].credentials[0].key_sha256)",
        ),
        ("  - name: a\n", "callers[0] has no credential"),
        (
            "  - name: a\n    credentials: [{key_env: A}]\n    limits: {requests_per_minute: -5}\n",
            "callers[0].limits.requests_per_minute must be greater than 0",
        ),
        (
            "  - name: a\n    credentials: [{key_env: A}]\n    limits: {request_per_minute: 5}\n",
            "callers[0].limits.request_per_minute is not a known setting",
        ),
        (
            "  - name: a\n    credentials: [{key_sha256: abc123}]\n",
            "callers[0].credentials[0].key_sha256 must be the key's SHA-256 as 64 hex digits",
        ),
        (
            "  - name: a\n    credentials: [{key_env: A}]\n  - name: a\n    credentials: [{key_env: C}]\n",
            "callers give one name to two callers (callers[0].name and callers[1].name)",
        ),
        (
            "  - name: a\n    credentials: [{key_env: A, key_sha256: " + SHA + "}]\n",
            "callers[0].credentials[0] must give exactly one of key_env, key_file, key_sha256 or "
            "tls_identity",
        ),
        (
            "  - name: a\n    credentials: [{key_env: A}]\n    limits: {burst: {tokens: 5}}\n",
            "burst.tokens needs tokens_per_minute",
        ),
        (
            "  - name: a\n    credentials: [{key_env: UNSET}]\n",
            "callers[0].credentials[0].key_env names UNSET",
        ),
        (
            "  - name: a\n    credentials: [{tls_identity: spiffe://mesh/ns/a/sa/b}]\n",
            "callers[0].credentials[0].tls_identity needs client certificates: set tls-client-ca",
        ),
        ("  - name: key-1234\n    credentials: [{key_env: A}]\n", "callers[0].name 'key-1234' is reserved"),
        # A name is matched whole: a trailing line break neither passes as another name nor
        # slips a reserved one through.
        ('  - name: "anonymous\\n"\n    credentials: [{key_env: A}]\n', "callers[0].name"),
        (
            "  - name: a\n    credentials: [{key_env: A}]\n"
            '  - name: "a\\n"\n    credentials: [{key_env: C}]\n',
            "callers[1].name",
        ),
        ('  - name: a\n    credentials: [{key_sha256: "' + SHA + '\\n"}]\n', "must be the key's SHA-256"),
    ],
    ids=[
        "one-key-twice",
        "one-hash-twice",
        "no-credential",
        "negative-limit",
        "unknown-limit",
        "bad-sha256",
        "one-name-twice",
        "two-in-one-credential",
        "burst-without-its-limit",
        "unset-variable",
        "identity-without-mtls",
        "reserved-name",
        "reserved-name-and-a-line-break",
        "a-name-and-a-line-break",
        "a-sha256-and-a-line-break",
    ],
)
def test_a_bad_callers_section_is_one_line_naming_its_place(
    tmp_path: Path, section: str, expected: str
) -> None:
    message = refusal(tmp_path, "callers:\n" + section, {"A": SEARCH_KEY, "B": SEARCH_KEY, "C": ADS_KEY})

    assert expected in message
    assert "callers in" in message  # where it came from
    assert SEARCH_KEY not in message
    assert ADS_KEY not in message


def test_a_key_file_line_with_a_comment_after_the_key_is_refused_naming_the_line(tmp_path: Path) -> None:
    """`#` starts a comment on a line of its own; after a key it would become part of the key
    (and the key itself be refused on every call)."""
    keys = tmp_path / "keys"
    keys.write_text(f"# the ads team\n{ADS_KEY}  # prod\n", encoding="utf-8")
    keys.chmod(0o600)

    message = refusal(tmp_path, f"callers:\n  - name: ads\n    credentials: [{{key_file: {keys}}}]\n")

    assert "line 2 holds a space" in message
    assert ADS_KEY not in message


@pytest.mark.parametrize("field", ["key", "api_key"])
def test_a_key_written_in_the_file_is_refused_without_repeating_it(tmp_path: Path, field: str) -> None:
    message = refusal(tmp_path, f"callers:\n  - name: a\n    credentials: [{{{field}: {SEARCH_KEY}}}]\n")

    assert "a key is never written in the file" in message
    assert SEARCH_KEY not in message


def test_a_key_pasted_as_a_variable_name_is_not_repeated(tmp_path: Path) -> None:
    message = refusal(tmp_path, "callers:\n  - name: a\n    credentials: [{key_env: 'sk-live 0123'}]\n")

    assert "must name an environment variable" in message
    assert "sk-live" not in message


def test_a_caller_key_also_given_in_api_keys_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rerank.yaml"
    path.write_text(
        "backend: local\ncallers:\n  - name: a\n    credentials: [{key_env: A}]\n", encoding="utf-8"
    )

    with pytest.raises(ConfigError, match=r"callers\[0\]\.credentials\[0\] holds the same key as api-keys"):
        load_settings({"config": str(path)}, {"A": SEARCH_KEY, "RERANK_API_KEYS": f"x,{SEARCH_KEY}"})


def test_callers_need_an_upstream_key_their_keys_never_go_upstream(tmp_path: Path) -> None:
    path = tmp_path / "rerank.yaml"
    path.write_text(
        "backend: upstream\ncallers:\n  - name: a\n    credentials: [{key_env: A}]\n", encoding="utf-8"
    )

    with pytest.raises(ConfigError, match="callers are set but the upstream has no key"):
        load_settings({"config": str(path)}, {"A": SEARCH_KEY})
    assert not load_settings(
        {"config": str(path)}, {"A": SEARCH_KEY, "RERANK_UPSTREAM_API_KEY": "sk-up"}
    ).pass_through


def test_a_model_no_route_serves_is_refused(tmp_path: Path) -> None:
    message = refusal(
        tmp_path,
        "models:\n  - name: m\n    deployments: [{format: local, source: bundled}]\n"
        "callers:\n  - name: a\n    credentials: [{key_env: A}]\n    models: [m, typo]\n",
        {"A": SEARCH_KEY},
    )

    assert "callers[0].models[1] names 'typo', which no route of the models section serves" in message


# --- the directory --------------------------------------------------------------------------


def directory(tmp_path: Path, **kwargs: object) -> CallerDirectory:
    settings = load(
        tmp_path,
        f"""tls_cert: /dev/null
tls_key: /dev/null
tls_client_ca: /dev/null
callers:
  - name: search
    credentials: [{{key_env: SEARCH}}, {{key_sha256: {SHA}}}]
    models: [qwen3-rerank]
  - name: indexer
    credentials: [{{tls_identity: "spiffe://mesh/ns/search/sa/indexer"}}, {{tls_identity: batch-cn}}]
""",
        {"SEARCH": SEARCH_KEY},
    )
    return CallerDirectory(caller_configs(settings.callers), **kwargs)  # type: ignore[arg-type]


def test_a_key_or_its_hash_or_a_certificate_names_its_caller(tmp_path: Path) -> None:
    callers = directory(tmp_path)

    by_key = callers.identify(Secret(SEARCH_KEY))
    by_hash = callers.identify(Secret("sk-hashed-key"))
    by_uri = callers.identify(None, ["spiffe://mesh/ns/search/sa/indexer"])
    by_cn = callers.identify(Secret("unknown"), ["batch-cn"])

    assert by_key is not None
    assert by_key is by_hash
    assert by_key.name == "search"
    assert by_uri is not None
    assert by_uri is by_cn
    assert by_uri.name == "indexer"
    assert callers.identify(Secret("unknown")) is None
    assert callers.identify(None, ["spiffe://mesh/ns/other"]) is None
    assert callers.enabled
    assert callers.identifies_peers


@pytest.mark.parametrize(
    ("written", "models"), [('"*"', None), ("qwen3-rerank", frozenset({"qwen3-rerank"}))]
)
def test_one_model_name_is_a_list_of_one(tmp_path: Path, written: str, models: frozenset[str] | None) -> None:
    """`models: "*"`, as TENANTS.md writes the default, was refused ("a valid tuple")."""
    text = (
        f"callers:\n  - name: search\n    credentials: [{{key_env: SEARCH_API_KEY}}]\n    models: {written}\n"
    )

    (search,) = caller_configs(load(tmp_path, text, {"SEARCH_API_KEY": SEARCH_KEY}).callers)

    assert search.models == models


def test_names_in_one_string_are_refused_not_taken_for_one_name(tmp_path: Path) -> None:
    """`models: a, b` is one YAML string: taken as one name no route has, the caller could
    call nothing (and a reload with the slip was applied)."""
    text = "callers:\n  - name: search\n    credentials: [{key_env: SEARCH_API_KEY}]\n"
    message = refusal(
        tmp_path, text + "    models: qwen3-rerank, gte-rerank-v2\n", {"SEARCH_API_KEY": SEARCH_KEY}
    )

    assert message.startswith("callers[0].models[0] 'qwen3-rerank, gte-rerank-v2' is no model name")


def test_a_caller_with_an_empty_model_list_is_refused(tmp_path: Path) -> None:
    """It was taken, and every call of the caller then refused PERMISSION_DENIED."""
    text = "callers:\n  - name: search\n    credentials: [{key_env: SEARCH_API_KEY}]\n    models: []\n"

    message = refusal(tmp_path, text, {"SEARCH_API_KEY": SEARCH_KEY})

    assert message.startswith("callers[0].models is empty: the caller could call no model")


def test_a_caller_may_call_only_its_models(tmp_path: Path) -> None:
    search = directory(tmp_path).identify(Secret(SEARCH_KEY))
    assert search is not None

    search.check_model("qwen3-rerank")
    with pytest.raises(ServiceError) as refused:
        search.check_model("gte-rerank-v2")

    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.metadata == {"caller": "search", "model": "gte-rerank-v2"}


def test_api_keys_are_anonymous_callers_named_after_their_hash() -> None:
    callers = CallerDirectory(api_keys=[Secret(SEARCH_KEY)])

    found = callers.identify(Secret(SEARCH_KEY))

    assert found is not None
    assert found.name == "key-" + hashlib.sha256(SEARCH_KEY.encode()).hexdigest()[:8]
    assert not found.configured
    assert found.models is None
    assert found.limits is None


def test_without_keys_every_call_is_anonymous_or_named_after_the_token_it_passes_through() -> None:
    open_service = CallerDirectory()
    pass_through = CallerDirectory(pass_through=True)

    assert open_service.identify(Secret("anything")) is ANONYMOUS_CALLER
    passed = pass_through.identify(Secret(SEARCH_KEY))
    assert passed is not None
    assert passed.name == "key-" + hashlib.sha256(SEARCH_KEY.encode()).hexdigest()[:8]
    assert passed.per_token  # one per token: its metric label waits for an answered call
    assert not ANONYMOUS_CALLER.per_token
    assert pass_through.identify(None) is ANONYMOUS_CALLER
    assert not open_service.enabled
    assert not pass_through.enabled


def test_a_reload_swaps_the_callers_and_keeps_the_api_keys(tmp_path: Path) -> None:
    callers = directory(tmp_path, api_keys=[Secret(ADS_KEY)])

    callers.update(())

    assert callers.identify(Secret(SEARCH_KEY)) is None
    assert callers.identify(Secret(ADS_KEY)) is not None


def test_a_certificate_is_named_by_its_uri_sans_or_else_its_common_name() -> None:
    assert certificate_identities(["spiffe://a", "spiffe://b"], "cn") == ["spiffe://a", "spiffe://b"]
    assert certificate_identities([], "cn") == ["cn"]
    assert certificate_identities([], None) == []


def test_a_common_name_written_as_a_uri_names_no_one() -> None:
    """Only a URI SAN carries a URI identity: a CN-only certificate whose CN spells a SPIFFE
    ID (any name a client CA signs) is not that workload."""
    assert certificate_identities([], "spiffe://mesh/ns/search/sa/indexer") == []
    assert certificate_identities(["spiffe://mesh/ns/search/sa/indexer"], "x") == [
        "spiffe://mesh/ns/search/sa/indexer"
    ]


@pytest.mark.parametrize("control", ["\x00", "\n", "\x1b", "\x7f", "\x85"])
def test_a_certificate_identity_holding_a_control_character_is_refused_without_repeating_it(
    control: str,
) -> None:
    """grpc's auth context cuts a name at a NUL: `indexer\\0.evil` read as `indexer`. Such a
    name is no identity on either port, and the refusal does not carry the raw byte."""
    uri = f"spiffe://mesh/ns/search/sa/indexer{control}.evil"

    with pytest.raises(ServiceError) as by_uri:
        certificate_identities(["spiffe://mesh/ns/ads/sa/ads", uri], "x")
    with pytest.raises(ServiceError) as by_cn:
        certificate_identities([], f"batch{control}evil")

    for refused, what in ((by_uri, "a URI SAN"), (by_cn, "its subject CN")):
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.message == (
            f"the client certificate's identity ({what}) holds a control character: it names no caller"
        )
    assert certificate_identities([], "bätch") == ["bätch"]  # not a control character


def two_callers(tmp_path: Path) -> CallerDirectory:
    settings = load(
        tmp_path,
        """tls_cert: /dev/null
tls_key: /dev/null
tls_client_ca: /dev/null
callers:
  - name: indexer
    credentials: [{tls_identity: "spiffe://mesh/ns/search/sa/indexer"}, {tls_identity: indexer-cn}]
  - name: ads
    credentials: [{tls_identity: "spiffe://mesh/ns/ads/sa/ads"}, {key_env: ADS}]
""",
        {"ADS": ADS_KEY},
    )
    return CallerDirectory(caller_configs(settings.callers))


def test_a_certificate_naming_two_callers_is_refused_not_taken_for_its_first_sans(tmp_path: Path) -> None:
    """It was the first SAN's caller: the SANs' order chose among the callers."""
    callers = two_callers(tmp_path)
    ads, indexer = "spiffe://mesh/ns/ads/sa/ads", "spiffe://mesh/ns/search/sa/indexer"

    with pytest.raises(ServiceError) as refused:
        callers.identify(None, [ads, indexer])

    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.message == (
        f"the client certificate names more than one caller ({ads!r} and {indexer!r} are two callers' "
        "identities): a certificate must name one"
    )
    with pytest.raises(ServiceError):
        callers.identify(Secret("sk-unknown"), [indexer, ads])
    found = callers.identify(Secret(ADS_KEY), [indexer, ads])  # an accepted key decides
    assert found is not None
    assert found.name == "ads"


def test_a_certificate_naming_one_caller_among_other_names_is_that_caller(tmp_path: Path) -> None:
    callers = two_callers(tmp_path)
    indexer = "spiffe://mesh/ns/search/sa/indexer"

    second_named = callers.identify(None, ["spiffe://mesh/ns/other/sa/unknown", indexer])
    named_twice = callers.identify(None, [indexer, "indexer-cn"])  # two identities of one caller

    assert second_named is not None
    assert second_named.name == "indexer"
    assert named_twice is second_named


# --- the fair share of admission ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_caller_alone_may_take_every_slot() -> None:
    admission = Admission(10, caller_max_share=0.5, clock=Clock())

    for _ in range(10):
        admission.enter(0, "flood")

    assert admission.held("flood") == 10


def test_a_caller_past_its_share_is_refused_while_another_calls() -> None:
    clock = Clock()
    admission = Admission(10, caller_max_share=0.5, clock=clock)
    admission.enter(0, "polite")
    admission.release(0, "polite")  # gone, but it called just now

    for _ in range(5):
        admission.enter(0, "flood")
    with pytest.raises(ServiceError) as refused:
        admission.enter(0, "flood")
    admission.enter(0, "polite")  # the others' room is there

    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.metadata == {"caller": "flood", "limit": "fair_share"}
    assert refused.value.quota_violations[0].subject == "caller:flood"
    clock.now += 2.0  # long after: polite still holds a slot, so flood is still held to its share
    with pytest.raises(ServiceError):
        admission.enter(0, "flood")
    admission.release(0, "polite")
    admission.enter(0, "flood")  # alone again, after the window


def test_a_caller_refused_for_a_full_admission_counts_as_calling() -> None:
    admission = Admission(4, caller_max_share=0.5, clock=Clock())
    for _ in range(4):
        admission.enter(0, "flood")
    with pytest.raises(ServiceError):
        admission.enter(0, "polite")  # overloaded: every slot is the flood's
    for _ in range(3):
        admission.release(0, "flood")  # the flood's calls end ...

    admission.enter(0, "flood")  # 2 of 4: its share
    with pytest.raises(ServiceError) as refused:
        admission.enter(0, "flood")  # ... and it may not take them all again: polite is waiting

    assert refused.value.metadata["limit"] == "fair_share"
    admission.enter(0, "polite")


def test_a_caller_with_a_concurrent_limit_of_its_own_counts_as_another_caller() -> None:
    """The indexer is held to its own limit, not to the share: but while it calls, the flood
    is held to its share, as beside any other caller."""
    admission = Admission(8, caller_max_share=0.5, clock=Clock())
    admission.enter(0, "indexer", capped=False)

    for _ in range(4):
        admission.enter(0, "flood")
    with pytest.raises(ServiceError) as refused:
        admission.enter(0, "flood")  # past its share (4 of 8) while the indexer calls
    for _ in range(2):
        admission.release(0, "flood")
    for _ in range(4):
        admission.enter(0, "indexer", capped=False)  # 5 of 8, past the share: not held to it

    assert refused.value.metadata == {"caller": "flood", "limit": "fair_share"}
    assert admission.held("indexer") == 5


def test_a_call_of_a_caller_with_a_concurrent_limit_takes_its_slot_as_that_caller() -> None:
    """Through the call pipeline: the indexer's calls (its own concurrent limit) count as a
    caller calling, so the flood beside them is held to its share."""
    admission = Admission(4, caller_max_share=0.5, clock=Clock())
    pipeline = Pipeline(cast(RerankEngine, None), admission, CallerDirectory())
    measured = pipeline.metrics.for_method("/rerank.v1.RerankService/Rerank")
    indexer = Caller("indexer", limits=CallerLimits(concurrent=10), configured=True)
    flood = Caller("flood", configured=True)

    def admitted(caller: Caller) -> Call:
        # Opened in a context of its own: a call left open leaves its request id bound there.
        context = contextvars.copy_context()
        call = context.run(pipeline.open, "/rerank.v1.RerankService/Rerank", "peer", measured)
        call.caller = caller
        call.admit(0)
        return call

    admitted(indexer)
    admitted(flood)
    admitted(flood)
    with pytest.raises(ServiceError) as refused:
        admitted(flood)

    assert refused.value.metadata == {"caller": "flood", "limit": "fair_share"}
    assert admission.held("indexer") == 1


class _FailingEngine:
    """An engine whose every call ends in `error` (after the limits were taken), having kept
    `answered` as spent, as the engine keeps a split call's chunks answered before another
    failed it."""

    def __init__(self, error: ServiceError, answered: tuple[BackendResult, ...] = ()) -> None:
        self.error = error
        self.answered = answered

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("qwen3-rerank", 100, 100, supports_instruct=True, backend="upstream")]

    def validate(self, request: RerankRequest, may_call: Callable[[str], None] | None = None) -> Validated:
        return self.models()[0], CallLimits()

    async def prepare(self, request: RerankRequest, validated: Validated | None = None) -> Prepared:
        model, _ = validated or self.validate(request)
        return Prepared(request, model, None, request, [range(len(request.documents))])

    async def run(self, prepared: Prepared, context: CallContext) -> RerankOutcome:
        if self.answered and context.attempted is not None:
            context.attempted.spend(self.answered)
        raise self.error


_TOKENS = BucketLimit("tokens_per_minute", 0.001, 1000)  # no refill within a test
_REQUEST = RerankRequest("qwen3-rerank", "what is a bucket", ["a token bucket"] * 3)


def _tokens_left_after(error: ServiceError, answered: tuple[BackendResult, ...] = ()) -> float:
    """What a caller's tokens bucket (1,000) holds once a call that ended in `error` is done
    (its engine having kept `answered` as spent)."""
    caller = Caller("search", limits=CallerLimits(tokens=_TOKENS), configured=True)
    engine = _FailingEngine(error, answered)
    pipeline = Pipeline(cast(RerankEngine, engine), Admission(4), CallerDirectory())
    measured = pipeline.metrics.for_method("/rerank.v1.RerankService/Rerank")
    call = pipeline.open("/rerank.v1.RerankService/Rerank", "peer", measured)
    call.caller = caller
    call.admit(0)

    async def run() -> None:
        with pytest.raises(ServiceError) as failed:
            await call.rerank(_REQUEST, CallContext())
        call.failed(failed.value)

    asyncio.run(run())
    call.finish()
    return pipeline.limiter.local.level("search", _TOKENS)


@pytest.mark.parametrize(
    ("code", "charged"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),  # the upstream may have billed it
        (grpc.StatusCode.CANCELLED, True),
        (grpc.StatusCode.UNAVAILABLE, False),  # nothing was scored
        (grpc.StatusCode.INVALID_ARGUMENT, False),
    ],
)
def test_a_call_given_up_keeps_its_token_estimate_charged_and_a_failed_one_gives_it_back(
    code: grpc.StatusCode, charged: bool
) -> None:
    left = _tokens_left_after(ServiceError(code, "it ended so"))

    assert left == pytest.approx(1000 - estimated_tokens(_REQUEST) if charged else 1000, abs=0.01)


def test_a_split_call_failed_by_one_chunk_is_charged_what_its_answered_chunks_used() -> None:
    """The upstream billed them and the cache keeps their scores: giving the whole estimate
    back would leave them free for good."""
    refused = ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "the last chunk was refused")
    answered = BackendResult([ScoredDocument(0, 0.5)], total_tokens=7)

    left = _tokens_left_after(refused, (answered,))

    assert estimated_tokens(_REQUEST) != 7
    assert left == pytest.approx(1000 - 7, abs=0.01)


class _TruncatingEngine(_FailingEngine):
    """An engine that scores the call's one long document cut to its start (long_documents
    TRUNCATE), and whose every call then passes its deadline."""

    async def prepare(self, request: RerankRequest, validated: Validated | None = None) -> Prepared:
        model, _ = validated or self.validate(request)
        scored = replaced(request, documents=[document[:30] for document in request.documents])
        return Prepared(request, model, None, scored, [range(len(scored.documents))])


def test_a_call_is_charged_the_tokens_of_what_is_scored_and_the_documents_it_sent() -> None:
    """A long document truncated to its start costs the start: estimated on the whole
    document, it was refused for tokens it would never use (or, chunked, undercharged)."""
    tokens = BucketLimit("tokens_per_minute", 0.001, 1000)  # no refill within the test
    documents = BucketLimit("documents_per_minute", 0.001, 10)
    caller = Caller("search", limits=CallerLimits(tokens=tokens, documents=documents), configured=True)
    passed = ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "it ended so")  # the estimate stays charged
    pipeline = Pipeline(cast(RerankEngine, _TruncatingEngine(passed)), Admission(4), CallerDirectory())
    measured = pipeline.metrics.for_method("/rerank.v1.RerankService/Rerank")
    request = RerankRequest("qwen3-rerank", "what is a bucket", ["a token bucket " * 1000, "short"])
    scored = replaced(request, documents=[document[:30] for document in request.documents])
    call = pipeline.open("/rerank.v1.RerankService/Rerank", "peer", measured)
    call.caller = caller
    call.admit(0)

    async def run() -> None:
        with pytest.raises(ServiceError) as failed:
            await call.rerank(request, CallContext())
        call.failed(failed.value)

    asyncio.run(run())
    call.finish()

    assert estimated_tokens(request) > 1000  # on the whole text it would have been refused
    assert pipeline.limiter.local.level("search", tokens) == pytest.approx(
        1000 - estimated_tokens(scored), abs=0.01
    )
    assert pipeline.limiter.local.level("search", documents) == pytest.approx(10 - 2, abs=0.01)


class _AnsweringEngine(_FailingEngine):
    """An engine whose every call is answered, `tokens` used."""

    def __init__(self, tokens: int) -> None:
        super().__init__(ServiceError(grpc.StatusCode.INTERNAL, "unused"))
        self.tokens = tokens

    async def run(self, prepared: Prepared, context: CallContext) -> RerankOutcome:
        return RerankOutcome([], self.tokens, [])


def test_a_call_in_flight_through_a_reload_settles_on_the_callers_limits_as_they_are_now() -> None:
    """Settled on the limits it was admitted under, a call capped the bucket at the old
    burst (a raised limit refused what it allows) or refilled it at the old rate."""
    clock = Clock()
    old = CallerLimits(tokens=BucketLimit("tokens_per_minute", 60, 1000))  # 1 a second
    new = CallerLimits(tokens=BucketLimit("tokens_per_minute", 60_000, 60_000))  # 1,000 a second
    digest = frozenset({key_digest(SEARCH_KEY)})
    callers = CallerDirectory([CallerConfig("search", digest, frozenset(), None, old)])
    request = RerankRequest("qwen3-rerank", "what is a bucket", ["a token bucket"] * 3)
    taken = estimated_tokens(request)
    pipeline = Pipeline(cast(RerankEngine, _AnsweringEngine(taken + 1)), Admission(4), callers)
    pipeline.limiter.local = LocalBuckets(clock)
    call = pipeline.open("/rerank.v1.RerankService/Rerank", "peer", pipeline.metrics.for_method("m"))
    call.caller = callers.identify(Secret(SEARCH_KEY))
    call.admit(0)
    asyncio.run(call.rerank(request, CallContext()))
    callers.update([CallerConfig("search", digest, frozenset(), None, new)])  # a SIGHUP
    clock.now += 10.0
    call.succeeded()
    call.finish()

    assert new.tokens is not None
    # Refilled for 10 s at the new rate, then corrected by the one token more than taken.
    assert pipeline.limiter.local.level("search", new.tokens) == pytest.approx(1000 - taken + 10_000 - 1)


def test_a_call_answered_by_its_backend_is_charged_what_it_used_whatever_ended_it() -> None:
    """The backend answered (600 tokens), then the caller hung up before the answer went out:
    charged the answer's count, not the estimate, nor nothing."""
    tokens = BucketLimit("tokens_per_minute", 0.001, 1000)  # no refill within the test
    caller = Caller("search", limits=CallerLimits(tokens=tokens), configured=True)
    pipeline = Pipeline(cast(RerankEngine, _AnsweringEngine(600)), Admission(4), CallerDirectory())
    measured = pipeline.metrics.for_method("/rerank.v1.RerankService/Rerank")
    request = RerankRequest("qwen3-rerank", "what is a bucket", ["a token bucket"] * 3)
    call = pipeline.open("/rerank.v1.RerankService/Rerank", "peer", measured)
    call.caller = caller
    call.admit(0)

    asyncio.run(call.rerank(request, CallContext()))
    call.failed(ServiceError(grpc.StatusCode.CANCELLED, "the caller hung up"))
    call.finish()

    assert estimated_tokens(request) != 600
    assert pipeline.limiter.local.level("search", tokens) == pytest.approx(1000 - 600, abs=0.01)


def test_a_share_of_one_caps_nobody() -> None:
    admission = Admission(3, clock=Clock())
    admission.enter(0, "polite")

    for _ in range(2):
        admission.enter(0, "flood")

    assert admission.held("flood") == 2


def test_a_key_pasted_where_its_variable_goes_is_not_repeated_when_unset() -> None:
    pasted = "sk_live_0123456789abcdef"  # matches a variable's pattern, but is not upper case
    caller = CallerEntry.model_validate({"name": "team", "credentials": [{"key_env": pasted}]})

    with pytest.raises(CallerKeyError) as refused:
        with_caller_keys((caller,), env={})

    assert pasted not in str(refused.value)
    assert "names a variable, which is not set" in str(refused.value)


@pytest.mark.parametrize(
    ("limits", "where"),
    [
        ("{requests_per_minute: on}", "callers[0].limits.requests_per_minute"),
        ("{concurrent: yes}", "callers[0].limits.concurrent"),
        ("{tokens_per_minute: 100, burst: {tokens: true}}", "callers[0].limits.burst.tokens"),
    ],
)
def test_a_yaml_switch_where_a_limit_takes_a_number_is_refused(
    tmp_path: Path, limits: str, where: str
) -> None:
    text = f"callers:\n  - name: a\n    credentials: [{{key_sha256: {SHA}}}]\n    limits: {limits}\n"

    assert refusal(tmp_path, text).startswith(f"{where} must be a number, not a switch")


def test_a_token_of_bytes_that_are_not_utf8_is_named_and_matches_no_key() -> None:
    """aiohttp hands an HTTP header's non-UTF-8 bytes on as surrogates (pass-through names a
    caller after its token; with keys, the token is looked up): no bug, no key."""
    token = "tok\udcff\udcfe"  # b"tok\xff\xfe" as aiohttp decodes it
    directory = CallerDirectory(api_keys=(Secret("tok"),))

    assert anonymous_name(token).startswith("key-")
    assert not directory.accepts(Secret(token))


@pytest.mark.parametrize(
    "section",
    [f"callers: [{SEARCH_KEY}]\n", f"callers: {SEARCH_KEY}\n", f"callers:\n  - {SEARCH_KEY}\n"],
    ids=["flow-list", "bare-string", "block-list"],
)
def test_a_key_pasted_as_a_caller_is_not_repeated(tmp_path: Path, section: str) -> None:
    message = refusal(tmp_path, section)

    assert message.startswith("callers")
    assert SEARCH_KEY not in message
