"""A comment or a blank inside a key variable (`RERANK_API_KEYS="sk-a # prod"`, a caller's
key_env `SEARCH_KEY="sk-b  # search team"`) is refused at load, naming the variable and
the key's place, never the key: it was taken into the key, and every call with the real
key was then refused UNAUTHENTICATED. Key files refused this already ("line N holds a space")."""

from __future__ import annotations

from pathlib import Path

import pytest

from rerank_service.config import ConfigError, load_settings
from tests.unit.test_callers import ADS_KEY, SEARCH_KEY, load, refusal


def _api_keys_refusal(value: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {"RERANK_API_KEYS": value})
    return str(raised.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            f"{SEARCH_KEY} # prod, {ADS_KEY}",
            "RERANK_API_KEYS: key 1 of its comma-separated list holds a space: write the key alone, "
            "with no comment",
        ),
        (
            f"{SEARCH_KEY},{ADS_KEY}\tads team",
            "RERANK_API_KEYS: key 2 of its comma-separated list holds a space: write the key alone, "
            "with no comment",
        ),
        (
            f"{SEARCH_KEY},{ADS_KEY}\x7f",
            "RERANK_API_KEYS: key 2 of its comma-separated list holds a control character",
        ),
    ],
    ids=["comment", "tab", "control"],
)
def test_an_api_keys_variable_with_a_comment_or_a_blank_in_a_key_is_refused(value: str, message: str) -> None:
    refused = _api_keys_refusal(value)

    assert refused == message
    assert SEARCH_KEY not in refused
    assert ADS_KEY not in refused


def test_blanks_around_the_commas_of_an_api_keys_variable_are_still_left_out() -> None:
    settings = load_settings({}, {"RERANK_API_KEYS": f" {SEARCH_KEY} ,\n{ADS_KEY}, "})

    assert [key.reveal() for key in settings.api_keys] == [SEARCH_KEY, ADS_KEY]


CALLER = "callers:\n  - name: search\n    credentials: [{key_env: SEARCH_KEY}]\n"


@pytest.mark.parametrize(
    ("value", "fault"),
    [
        (f"{SEARCH_KEY}  # search team", "holds a space: write the key alone, with no comment"),
        (
            f"{SEARCH_KEY}\nsk-second-0123456789",
            "holds more than one line: write the key alone, with no comment",
        ),
    ],
    ids=["comment", "two-lines"],
)
def test_a_caller_key_variable_with_a_comment_is_refused_naming_the_variable(
    tmp_path: Path, value: str, fault: str
) -> None:
    message = refusal(tmp_path, CALLER, {"SEARCH_KEY": value})

    assert message.startswith(f"callers[0].credentials[0].key_env: SEARCH_KEY {fault} (from callers in ")
    assert SEARCH_KEY not in message


def test_a_caller_key_variable_with_blanks_around_the_key_still_loads(tmp_path: Path) -> None:
    settings = load(tmp_path, CALLER, {"SEARCH_KEY": f"  {SEARCH_KEY}\n"})

    assert [key.reveal() for key in settings.callers[0].credentials[0].keys] == [SEARCH_KEY]
