"""Every integer setting has an upper bound: an unbounded one (10**20) passed check-config,
then serve died logging it (`TypeError: Integer exceeds 64-bit range`, exit 1)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import yaml

from rerank_service.config import ConfigError, load_settings
from rerank_service.config.settings import Option, options

HUGE = str(10**20)  # past 64 bits: what the log's JSON takes no more of
INTEGERS = [option for option in options() if option.expect.startswith("an integer")]


def test_the_integer_settings_are_found() -> None:
    names = {option.name for option in INTEGERS}
    assert {"max_connections_per_peer", "http_max_connections", "max_inflight_bytes", "workers"} <= names


@pytest.mark.parametrize("option", INTEGERS, ids=lambda option: option.name)
def test_an_integer_setting_past_its_bound_is_a_configuration_error(option: Option) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {option.env: HUGE})

    assert str(raised.value).startswith(f"{option.flag.removeprefix('--')} must be an integer from "), (
        raised.value
    )


def test_the_file_form_of_a_huge_count_is_refused_and_its_largest_is_logged(tmp_path: Path) -> None:
    path = tmp_path / "rerank.yaml"
    path.write_text(f"max_connections_per_peer: {HUGE}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="max-connections-per-peer must be an integer from 1 to 2147483647"):
        load_settings({"config": str(path)}, {})

    largest = load_settings(
        {"http_max_connections": str(2**31 - 1), "max_connections_per_peer": 2**31 - 1}, {}
    )
    orjson.dumps({"per_peer": largest.max_connections_per_peer, "http": largest.http_max_connections})


@pytest.mark.parametrize(
    ("document", "named"),
    [
        (
            {"models": [{"name": "m", "max_tokens_per_doc": 10**20, "deployments": [{"local": "bundled"}]}]},
            "max_tokens_per_doc",
        ),
        (
            {
                "callers": [
                    {
                        "name": "search",
                        "credentials": [
                            {"key_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
                        ],
                        "limits": {"concurrent": 10**20},
                    }
                ]
            },
            "concurrent",
        ),
    ],
    ids=["route max_tokens_per_doc", "caller concurrent"],
)
def test_a_nested_count_past_its_bound_is_a_configuration_error(
    tmp_path: Path, document: dict[str, object], named: str
) -> None:
    path = tmp_path / "rerank.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_settings({"config": str(path)}, {})

    assert named in str(raised.value)
    assert "2147483647" in str(raised.value)
