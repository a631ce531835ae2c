"""Reading bearer tokens from gRPC metadata and checking them against configured keys."""

from __future__ import annotations

import pytest

from rerank_service.config.secret import Secret
from rerank_service.pipeline.auth import Metadata, bearer_token
from rerank_service.pipeline.callers import CallerDirectory


def token_of(metadata: Metadata | None) -> str | None:
    token = bearer_token(metadata)
    return None if token is None else token.reveal()


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    assert token_of([("authorization", f"{scheme} tok-123")]) == "tok-123"


def test_metadata_key_is_matched_case_insensitively() -> None:
    assert token_of([("Authorization", "Bearer tok-123")]) == "tok-123"


def test_extra_spaces_around_and_between_are_ignored() -> None:
    assert token_of([("authorization", "   Bearer    tok-123   ")]) == "tok-123"


def test_returned_token_is_a_masked_secret() -> None:
    token = bearer_token([("authorization", "Bearer tok-123")])
    assert isinstance(token, Secret)
    assert "tok-123" not in repr(token)


@pytest.mark.parametrize("metadata", [None, [], [("x-request-id", "abc"), ("user-agent", "grpc")]])
def test_missing_authorization_gives_none(metadata: Metadata | None) -> None:
    assert bearer_token(metadata) is None


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Token tok-123", "tok-123", "Bearertok-123"])
def test_non_bearer_scheme_gives_none(value: str) -> None:
    assert bearer_token([("authorization", value)]) is None


@pytest.mark.parametrize("value", ["Bearer", "Bearer ", "Bearer     ", "", "   "])
def test_bearer_without_token_gives_none(value: str) -> None:
    assert bearer_token([("authorization", value)]) is None


def test_bytes_values_are_ignored() -> None:
    assert bearer_token([("authorization", b"Bearer tok-123")]) is None


def test_a_later_valid_entry_is_found_after_ignored_ones() -> None:
    metadata: list[tuple[str, str | bytes]] = [
        ("authorization", b"Bearer bytes-token"),
        ("authorization", "Basic abc"),
        ("authorization", "Bearer tok-123"),
    ]
    assert token_of(metadata) == "tok-123"


def test_caller_directory_accepts_each_configured_key() -> None:
    checker = CallerDirectory(api_keys=[Secret("key-one"), Secret("key-two")])
    assert checker.accepts(Secret("key-one"))
    assert checker.accepts(Secret("key-two"))


@pytest.mark.parametrize("candidate", ["key-three", "key-on", "key-one ", "KEY-ONE", ""])
def test_caller_directory_rejects_other_tokens(candidate: str) -> None:
    checker = CallerDirectory(api_keys=[Secret("key-one"), Secret("key-two")])
    assert not checker.accepts(Secret(candidate))


def test_caller_directory_rejects_a_missing_token() -> None:
    assert not CallerDirectory(api_keys=[Secret("key-one")]).accepts(None)


def test_caller_directory_enabled_only_with_keys() -> None:
    assert CallerDirectory(api_keys=[Secret("key-one")]).enabled
    assert not CallerDirectory(api_keys=[]).enabled


def test_caller_directory_without_keys_accepts_nothing() -> None:
    assert not CallerDirectory(api_keys=[]).accepts(Secret("anything"))


def test_a_tab_after_the_scheme_is_accepted() -> None:
    token = bearer_token([("authorization", "Bearer\tabc123")])

    assert token is not None
    assert token.reveal() == "abc123"
