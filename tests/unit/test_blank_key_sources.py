"""Key sources set to blanks alone (a Secret whose value is just a newline), and key files
given as `./` paths: a blank source is refused as one that holds no key, never read as
unset (which started the service with no authentication), and a `./` path is named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rerank_service.cli import main
from rerank_service.config import ConfigError, load_settings

BLANKS = [" ", "\n", " \t\n"]


def _refusal(args: dict[str, Any], env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as raised:
        load_settings(args, env)
    return str(raised.value)


@pytest.mark.parametrize("blank", BLANKS, ids=["space", "newline", "mixed"])
@pytest.mark.parametrize("variable", ["RERANK_API_KEYS", "RERANK_UPSTREAM_API_KEY", "DASHSCOPE_API_KEY"])
def test_a_key_variable_of_blanks_is_refused_as_holding_no_key(variable: str, blank: str) -> None:
    assert _refusal({}, {variable: blank}) == f"{variable} is set but holds no key"


def test_blank_caller_keys_never_start_the_service_with_authentication_off() -> None:
    """The bug: RERANK_API_KEYS=" " loaded with no keys, and the service served "auth": "open"."""
    with pytest.raises(ConfigError, match="RERANK_API_KEYS is set but holds no key"):
        load_settings(
            {"backend": "upstream"}, {"RERANK_API_KEYS": "\n", "RERANK_UPSTREAM_API_KEY": "sk-upstream"}
        )


def test_a_blank_upstream_key_variable_does_not_fall_through_to_the_next_one() -> None:
    assert _refusal({}, {"RERANK_UPSTREAM_API_KEY": "  ", "DASHSCOPE_API_KEY": "sk-ds"}) == (
        "RERANK_UPSTREAM_API_KEY is set but holds no key"
    )


@pytest.mark.parametrize("blank", BLANKS, ids=["space", "newline", "mixed"])
@pytest.mark.parametrize(
    ("args", "env", "origin"),
    [
        ({"api_keys_file": "{blank}"}, {}, "--api-keys-file"),
        ({}, {"RERANK_API_KEYS_FILE": "{blank}"}, "RERANK_API_KEYS_FILE"),
        ({"upstream_api_key_file": "{blank}"}, {}, "--upstream-api-key-file"),
        ({}, {"RERANK_UPSTREAM_API_KEY_FILE": "{blank}"}, "RERANK_UPSTREAM_API_KEY_FILE"),
    ],
)
def test_a_key_file_path_of_blanks_is_refused_as_naming_no_file(
    args: dict[str, str], env: dict[str, str], origin: str, blank: str
) -> None:
    args = {name: value.format(blank=blank) for name, value in args.items()}
    env = {name: value.format(blank=blank) for name, value in env.items()}

    assert _refusal(args, env) == f"{origin} is set but names no file (it is blank)"


def test_a_key_file_entry_of_blanks_in_the_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "rerank.yaml"
    config.write_text('api_keys_file: " "\n', encoding="utf-8")

    assert _refusal({"config": str(config)}, {}) == (
        f"api_keys_file in {config} is set but names no file (it is blank)"
    )


def test_an_empty_key_source_still_counts_as_unset(tmp_path: Path) -> None:
    config = tmp_path / "rerank.yaml"
    config.write_text('api_keys_file: ""\n', encoding="utf-8")
    empty = {"RERANK_API_KEYS": "", "RERANK_API_KEYS_FILE": "", "RERANK_UPSTREAM_API_KEY": ""}

    settings = load_settings(
        {"config": str(config), "api_keys_file": ""}, {**empty, "DASHSCOPE_API_KEY": "sk-ds"}
    )

    assert settings.api_keys == ()
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.reveal() == "sk-ds"


# --- a key file given as a ./ path is named (docs/OPERATIONS.md, "Settings and keys") -----------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ({"api_keys_file": "./missing-keys"}, {}, "api-keys-file ./missing-keys: No such file or directory"),
        ({}, {"RERANK_API_KEYS_FILE": "./missing-keys"}, "api-keys-file ./missing-keys: No such file"),
        (
            {},
            {"RERANK_UPSTREAM_API_KEY_FILE": "./missing-key"},
            "upstream-api-key-file ./missing-key: No such file or directory "
            "(from RERANK_UPSTREAM_API_KEY_FILE)",
        ),
    ],
)
def test_a_missing_key_file_given_as_a_dot_slash_path_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: dict[str, str], env: dict[str, str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)

    assert _refusal(args, env).startswith(message)


def test_a_key_file_with_a_space_given_as_a_dot_slash_path_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keys").write_text("one key # a comment\n", encoding="utf-8")
    (tmp_path / "keys").chmod(0o600)

    assert _refusal({"api_keys_file": "./keys"}, {}).startswith("api-keys-file ./keys: line 1 holds a space")


def test_the_client_names_a_missing_key_file_given_as_a_dot_slash_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RERANK_API_KEY", raising=False)

    assert main(["models", "--target", "127.0.0.1:1", "--api-key-file", "./missing-key"]) == 2

    assert capsys.readouterr().err.strip() == (
        "rerank-service: configuration error: api-key-file ./missing-key: No such file or directory"
    )
