"""load_settings and Settings: precedence, parsing, one-line errors, the config file, secrecy."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.server import channel_options
from rerank_service.cache.build import build_score_cache
from rerank_service.config import ConfigError, Settings, load_settings
from rerank_service.config.cores import usable_cores
from rerank_service.config.secret import Secret
from rerank_service.config.server import CacheConfig, GrpcConfig, LimitsStoreConfig, ServerConfig
from rerank_service.config.sources import build, file_layer
from rerank_service.observability.caller_metrics import CallerMetrics
from rerank_service.pipeline.limits import build_limiter
from tests.support.certs import CertificateAuthority

UPSTREAM_KEY = "sk-upstream-0123456789"
CALLER_KEY = "caller-key-abcdefgh"


def load(args: dict[str, Any] | None = None, /, **env: str) -> Settings:
    """load_settings with an explicit environment, never the process's own."""
    return load_settings(args or {}, env)


def refusal(args: dict[str, Any] | None = None, /, **env: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load(args, **env)
    message = str(raised.value)
    assert "\n" not in message, "a configuration error is one line"
    return message


def config_file(tmp_path: Path, text: str, name: str = "rerank.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def revealed(secrets: tuple[Secret, ...]) -> list[str]:
    return [secret.reveal() for secret in secrets]


# --- precedence: flag > environment > file > default --------------------------------------------


def test_a_flag_beats_a_variable_which_beats_the_file_which_beats_the_default(tmp_path: Path) -> None:
    path = config_file(tmp_path, "port: 1111\nupstream_timeout: 11\nmax_documents: 111\n")

    settings = load({"config": path, "port": "3333"}, RERANK_PORT="2222", RERANK_UPSTREAM_TIMEOUT="22")

    assert (settings.port, settings.upstream_timeout, settings.max_documents) == (3333, 22.0, 111)
    assert settings.max_query_tokens == Settings().max_query_tokens  # nothing set it
    assert dict(settings.sources) == {
        "port": "--port",
        "upstream_timeout": "RERANK_UPSTREAM_TIMEOUT",
        "max_documents": f"max_documents in {path}",
    }


def test_an_unset_flag_is_none_and_lets_the_variable_apply() -> None:
    settings = load({"port": None, "upstream_timeout": None}, RERANK_PORT="6000")

    assert (settings.port, settings.upstream_timeout) == (6000, 30.0)


def test_the_config_file_can_be_named_by_a_variable_and_the_flag_wins(tmp_path: Path) -> None:
    by_env = config_file(tmp_path, "port: 1000\n", "env.yaml")
    by_flag = config_file(tmp_path, "port: 2000\n", "flag.yaml")

    assert load(RERANK_CONFIG=by_env).port == 1000
    assert load({"config": by_flag}, RERANK_CONFIG=by_env).port == 2000


def test_an_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    path = config_file(tmp_path, "port: 1000\n")

    settings = load({"config": path}, RERANK_PORT="", RERANK_HOST="  ", RERANK_UPSTREAM_DIALECT="")

    assert (settings.port, settings.host, settings.upstream_dialect) == (1000, "0.0.0.0", "dashscope")


def test_a_given_env_replaces_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_PORT", "6000")

    assert load_settings({}, {}).port == 50051
    assert load_settings({}).port == 6000


def test_settings_built_directly_never_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_PORT", "6000")

    assert Settings().port == 50051
    assert Settings(backend="upstream").backend == "upstream"


def test_an_invalid_variable_is_not_checked_when_a_flag_overrides_it() -> None:
    assert load({"port": "1"}, RERANK_PORT="nonsense").port == 1


# --- how values are read --------------------------------------------------------------------------


def test_flag_values_that_are_not_strings_are_accepted() -> None:
    settings = load({"port": 8080, "upstream_timeout": 2.5})

    assert (settings.port, settings.upstream_timeout) == (8080, 2.5)


def test_choices_are_case_insensitive_and_trimmed() -> None:
    settings = load(RERANK_UPSTREAM_DIALECT=" Compatible ", RERANK_LOG_LEVEL="WARNING")

    assert (settings.upstream_dialect, settings.log_level) == ("compatible", "warning")


def test_an_upstream_url_loses_its_trailing_slash() -> None:
    assert load(RERANK_UPSTREAM_URL="https://example.com/base/").upstream_url == "https://example.com/base"


def test_upstream_models_are_split_trimmed_and_deduplicated_in_order() -> None:
    settings = load(RERANK_UPSTREAM_MODELS=" qwen3-rerank, ,gte-rerank-v2,,qwen3-rerank , extra ")

    assert settings.upstream_models == ("qwen3-rerank", "gte-rerank-v2", "extra")


def test_local_models_read_the_same_from_a_flag_string_and_a_file_mapping(tmp_path: Path) -> None:
    expected = (("qwen3-rerank", "/models/Qwen3-Reranker-0.6B"), ("mini", "bundled"))
    path = config_file(
        tmp_path, "local_models:\n  qwen3-rerank: /models/Qwen3-Reranker-0.6B\n  mini: bundled\n"
    )

    from_flag = load({"local_models": " qwen3-rerank=/models/Qwen3-Reranker-0.6B , mini=bundled ,"})

    assert from_flag.local_models == expected
    assert load({"config": path}).local_models == expected


def test_lists_in_the_file_may_also_be_written_as_the_flag_would(tmp_path: Path) -> None:
    as_list = config_file(tmp_path, "upstream_models: [a, b]\n", "list.yaml")
    as_string = config_file(tmp_path, "upstream_models: 'a, b'\n", "string.yaml")

    assert (
        load({"config": as_list}).upstream_models == load({"config": as_string}).upstream_models == ("a", "b")
    )


@pytest.mark.parametrize(("raw", "expected"), [("off", None), ("", None), ("9100", 9100), ("0", 0)])
def test_the_metrics_port_is_a_port_or_off(raw: str, expected: int | None) -> None:
    assert load(RERANK_METRICS_PORT=raw).metrics_port == expected


def test_yaml_off_means_off_for_switches_and_the_metrics_port(tmp_path: Path) -> None:
    path = config_file(tmp_path, "micro_batching: off\nmetrics_port: off\n")

    settings = load({"config": path})

    assert (settings.micro_batching, settings.metrics_port) == (False, None)
    assert load({"micro_batching": "OFF"}).micro_batching is False


def test_the_upstream_proxy_and_ca_file_are_read_and_unset_by_default() -> None:
    settings = load(RERANK_UPSTREAM_PROXY="http://proxy.internal:3128/", RERANK_UPSTREAM_CA_FILE="ca.pem")

    assert (settings.upstream_proxy, settings.upstream_ca_file) == (
        "http://proxy.internal:3128",
        Path("ca.pem"),
    )
    assert (Settings().upstream_proxy, Settings().upstream_ca_file) == (None, None)


# --- bad values: one line naming the setting and where the value came from -----------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"RERANK_UPSTREAM_DIALECT": "openai"},
            "upstream-dialect must be one of dashscope, compatible, cohere, tei, voyage, got 'openai'",
        ),
        ({"RERANK_BACKEND": "quantum"}, "backend must be one of local, upstream"),
        ({"RERANK_PORT": "65536"}, "port must be a port number from 0 to 65535, got '65536'"),
        ({"RERANK_PORT": "-1"}, "port must be a port number from 0 to 65535"),
        ({"RERANK_PORT": "80.5"}, "port must be a port number from 0 to 65535, got '80.5'"),
        ({"RERANK_UPSTREAM_URL": "ftp://x"}, "upstream-url must be an http(s) URL"),
        ({"RERANK_UPSTREAM_URL": "https://"}, "upstream-url must be an http(s) URL"),
        ({"RERANK_UPSTREAM_URL": "http://host:99999"}, "upstream-url has an invalid port"),
        ({"RERANK_UPSTREAM_PROXY": "socks5://proxy:1080"}, "upstream-proxy must be an http(s) URL"),
        ({"RERANK_UPSTREAM_PROXY": "proxy.internal:3128"}, "upstream-proxy must be an http(s) URL"),
        ({"RERANK_UPSTREAM_TIMEOUT": "0"}, "upstream-timeout must be a finite number of seconds > 0"),
        ({"RERANK_UPSTREAM_TIMEOUT": "soon"}, "upstream-timeout must be a finite number of seconds > 0"),
        ({"RERANK_UPSTREAM_TIMEOUT": "inf"}, "upstream-timeout must be a finite number"),
        ({"RERANK_UPSTREAM_TIMEOUT": "nan"}, "upstream-timeout must be a finite number"),
        ({"RERANK_UPSTREAM_TIMEOUT": "1e400"}, "upstream-timeout must be a finite number"),
        ({"RERANK_MAX_DOCUMENTS": "0"}, "max-documents must be an integer from 1 to 2147483647, got '0'"),
        (
            {"RERANK_UPSTREAM_BREAKER_FAILURES": "-1"},
            "upstream-breaker-failures must be an integer from 0 to 2147483647",
        ),
        ({"RERANK_MAX_CONNECTION_AGE": "-1"}, "max-connection-age must be a finite number of seconds >= 0"),
        ({"RERANK_MICRO_BATCHING": "maybe"}, "micro-batching must be on or off"),
        ({"RERANK_METRICS_PORT": "web"}, "metrics-port must be a port number from 0 to 65535, or off"),
        ({"RERANK_UPSTREAM_MODELS": " , ,"}, "upstream-models must name at least one model"),
        ({"RERANK_LOCAL_MODELS": "no-equals-sign"}, "local-models entries are NAME=SOURCE"),
        ({"RERANK_LOCAL_MODELS": "=bundled"}, "local-models entries are NAME=SOURCE"),
        ({"RERANK_LOCAL_MODELS": "name="}, "local-models entries are NAME=SOURCE"),
        ({"RERANK_LOCAL_MODELS": "a=bundled,a=/x"}, "local-models names 'a' twice"),
        ({"RERANK_LOCAL_MODELS": " , "}, "local-models must name at least one model"),
    ],
)
def test_a_bad_variable_is_refused_naming_the_setting_and_the_variable(
    env: dict[str, str], expected: str
) -> None:
    message = refusal(**env)

    assert message.startswith(expected)
    assert message.endswith(f"(from {next(iter(env))})")


def test_a_bad_proxy_url_is_refused_without_repeating_its_password() -> None:
    message = refusal(RERANK_UPSTREAM_PROXY="http://user:hunter2-password@proxy.internal:99999")

    assert message.startswith("upstream-proxy has an invalid port, got 'http://***@proxy.internal:99999'")
    assert "hunter2-password" not in message


URL_SECRET = "hunter2-Pass"


@pytest.mark.parametrize("separator", ["/", "#", "?"])
@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("RERANK_CACHE_STORE", "redis://default:{}@redis.internal:6379/0"),
        ("RERANK_LIMITS_STORE", "rediss://:{}@redis.internal:6380"),
        ("RERANK_UPSTREAM_PROXY", "http://user:{}@proxy.internal:3128"),
        ("RERANK_OTLP_ENDPOINT", "http://user:{}@collector:4317"),
        ("RERANK_UPSTREAM_URL", "https://user:{}@api.example"),
    ],
)
def test_a_url_whose_password_holds_a_slash_hash_or_question_mark_is_refused_without_repeating_it(
    variable: str, url: str, separator: str
) -> None:
    """An unencoded '/', '#' or '?' ends urlsplit's host part before the '@': it then sees no
    password, and the error once repeated the whole URL."""
    password = f"{URL_SECRET}{separator}XYZ"
    message = refusal(**{variable: url.format(password)})

    assert URL_SECRET not in message
    assert "XYZ" not in message


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("RERANK_UPSTREAM_URL", "https://api.example.com/client/v4/ai/run/@cf/baai"),
        ("RERANK_OTLP_ENDPOINT", "http://collector.observability:4318/tenant@a"),
        ("RERANK_UPSTREAM_PROXY", "http://10.0.0.7:3128/@x"),
        ("RERANK_OTLP_ENDPOINT", "http://otel-collector:4318/tenant@a"),  # a Kubernetes service
        ("RERANK_UPSTREAM_URL", "http://ai-gateway:8080/ai/run/@cf/baai"),
    ],
)
def test_an_at_sign_in_the_path_of_a_url_with_a_host_is_taken(variable: str, url: str) -> None:
    """Past a real host the '@' is the path's (a Workers AI model id): refused as a password
    holding '/', it stopped URLs that had worked."""
    settings = load(**{variable: url})

    assert url in (settings.upstream_url, settings.otlp_endpoint, settings.upstream_proxy)


def test_a_deployments_url_or_proxy_whose_password_holds_a_slash_is_refused_without_repeating_it(
    tmp_path: Path,
) -> None:
    deployment = "  - name: m\n    deployments:\n      - format: compatible\n        url: {url}\n"
    for url, proxy in [
        (f"'https://user:{URL_SECRET}/XYZ@api.example'", None),
        ("https://api.example", f"'http://user:{URL_SECRET}#XYZ@proxy:3128'"),
    ]:
        text = "models:\n" + deployment.format(url=url) + (f"        proxy: {proxy}\n" if proxy else "")
        message = refusal({"config": config_file(tmp_path, text)})

        assert message.startswith("models[0].deployments[0]."), message
        assert URL_SECRET not in message


def test_the_passwords_of_store_and_proxy_urls_are_among_the_secrets() -> None:
    """Masked in every log line: a Redis client's or a proxy's error may quote the URL."""
    settings = load(
        RERANK_CACHE_STORE="redis://:cache-Pass-1@redis:6379/0",
        RERANK_LIMITS_STORE="redis://default:limits%2FPass@redis:6379/1",
        RERANK_UPSTREAM_PROXY="http://user:proxy-Pass-3@proxy:3128",
        RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY,
    )

    assert set(revealed(tuple(settings.secrets()))) >= {
        "cache-Pass-1",
        "limits%2FPass",
        "limits/Pass",  # as written and as it is decoded: a library may quote either
        "proxy-Pass-3",
    }


def test_a_password_too_short_to_be_a_secret_is_masked_nowhere() -> None:
    """A password "2" masked every `"documents":2` of the log, which was then no JSON."""
    settings = load(RERANK_CACHE_STORE="redis://:2@redis:6379/0", RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY)
    shorter = load(RERANK_CACHE_STORE="redis://:hunter2@redis:6379/0", RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY)

    assert "2" not in revealed(tuple(settings.secrets()))
    assert "hunter2" in revealed(tuple(shorter.secrets()))  # masked where it stands alone


QUERY_SECRET = "sk-query-0123456789abcdef"


@pytest.mark.parametrize(
    ("url", "part"),
    [
        (f"https://api.example/v1?key={QUERY_SECRET}", "no query"),
        ("https://api.example/v1?", "no query"),
        (f"https://api.example/v1#{QUERY_SECRET}", "no fragment"),
        (f"https://user:{QUERY_SECRET}@api.example", "no user or password"),
        (f"https://{QUERY_SECRET}@api.example", "no user or password"),
    ],
    ids=["query", "bare-question-mark", "fragment", "user-password", "user"],
)
def test_an_upstream_url_with_a_query_fragment_or_credentials_is_refused_without_repeating_it(
    tmp_path: Path, url: str, part: str
) -> None:
    """ListModels shows the URL and the endpoint's path is appended to it: only a base URL fits."""
    path = config_file(tmp_path, f"upstream_url: '{url}'\n")
    for message, origin in [
        (refusal({"upstream_url": url}), "--upstream-url"),
        (refusal(RERANK_UPSTREAM_URL=url), "RERANK_UPSTREAM_URL"),
        (refusal({"config": path}), f"upstream_url in {path}"),
    ]:
        assert message.startswith(f"upstream-url must have {part}"), message
        assert message.endswith(f"(from {origin})")
        assert QUERY_SECRET not in message


def test_a_bad_flag_is_refused_naming_the_flag() -> None:
    assert (
        refusal({"port": "seventy"})
        == "port must be a port number from 0 to 65535, got 'seventy' (from --port)"
    )


def test_every_bad_setting_is_named_on_the_one_line() -> None:
    message = refusal(RERANK_PORT="x", RERANK_BACKEND="y")

    assert "port must be" in message
    assert "backend must be" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("port: [1, 2]\n", "port must be a port number from 0 to 65535, got [1, 2]"),
        ("port: 80.5\n", "port must be a port number from 0 to 65535, got 80.5"),
        ("upstream_timeout: soon\n", "upstream-timeout must be a finite number of seconds > 0, at most"),
        ("upstream_models: 5\n", "upstream-models must be comma-separated names (a list in the file), got 5"),
        ("backend: {name: upstream}\n", "backend must be one of local, upstream"),
    ],
)
def test_a_value_of_the_wrong_type_in_the_file_names_the_setting_and_the_file_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = config_file(tmp_path, text)
    key = text.split(":")[0]

    message = refusal({"config": path})

    assert message.startswith(expected)
    assert message.endswith(f"(from {key} in {path})")


def test_an_unknown_key_in_the_file_is_refused_with_the_closest_setting(tmp_path: Path) -> None:
    path = config_file(tmp_path, "upstream_timeout: 10\nupstrem_url: http://x\n")

    message = refusal({"config": path})

    assert message == f"config {path}: unknown setting 'upstrem_url' (did you mean 'upstream_url'?)"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("port: [1\n", "not valid YAML: expected ',' or ']'"),
        ("- port\n- 1\n", "must be a mapping of setting names to values"),
        ("just words\n", "must be a mapping of setting names to values"),
    ],
)
def test_a_config_file_that_is_not_a_yaml_mapping_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = config_file(tmp_path, text)

    assert refusal({"config": path}).startswith(f"config {path}: {problem}")


def test_a_missing_config_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"

    assert (
        refusal(RERANK_CONFIG=str(missing)) == f"config {missing}: cannot read it (No such file or directory)"
    )


@pytest.mark.parametrize(
    "text", ["", "  \n\n", "# nothing yet\n", "---\n"], ids=["empty", "blank", "comments", "null"]
)
def test_an_empty_config_file_is_refused_naming_it(tmp_path: Path, text: str) -> None:
    """A truncated file (or one caught mid-write) must not silently mean "every default"."""
    path = config_file(tmp_path, text)

    message = refusal({"config": path})

    assert message.startswith(f"config {path}: is empty")
    assert refusal(RERANK_CONFIG=path) == message


def test_a_config_file_of_an_empty_mapping_sets_nothing(tmp_path: Path) -> None:
    assert load({"config": config_file(tmp_path, "{}\n")}) == Settings()


@pytest.mark.parametrize("key", ["api_keys", "upstream_api_key"])
def test_a_key_written_into_the_config_file_is_refused(tmp_path: Path, key: str) -> None:
    path = config_file(tmp_path, f"{key}: {UPSTREAM_KEY}\n")

    message = refusal({"config": path})

    assert message.startswith(f"config {path}: {key} is a secret: name a key file ({key}")
    assert UPSTREAM_KEY not in message


def test_settings_built_directly_validate_too() -> None:
    with pytest.raises(ValidationError):
        Settings(port=70000)
    with pytest.raises(ValidationError):
        Settings(backend="quantum")  # type: ignore[arg-type]


def test_settings_are_frozen_and_replace_validates() -> None:
    settings = Settings()

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    assert dataclasses.replace(settings, port=0).port == 0
    with pytest.raises(ValidationError):
        dataclasses.replace(settings, port=-1)


# --- a nested section: how the coming `models:` routes will validate ------------------------------


class Deployment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str
    weight: int = Field(1, ge=1)


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    deployments: tuple[Deployment, ...]


@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class Routed:
    port: int = 0
    models: tuple[Route, ...] = ()


ROUTES = """\
models:
  - name: qwen3-rerank
    deployments:
      - url: https://a.example
      - url: https://b.example
        weight: {weight}
"""


def test_a_nested_section_in_the_file_validates_into_its_models(tmp_path: Path) -> None:
    path = Path(config_file(tmp_path, ROUTES.format(weight=3)))

    routed = build(Routed, file_layer(path, ["port", "models"]))

    assert routed.models[0].name == "qwen3-rerank"
    assert [(d.url, d.weight) for d in routed.models[0].deployments] == [
        ("https://a.example", 1),
        ("https://b.example", 3),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            ROUTES.format(weight=0),
            "models[0].deployments[1].weight must be greater than or equal to 1, got 0",
        ),
        (
            ROUTES.format(weight="1\n        region: eu"),
            "models[0].deployments[1].region is not a known setting",
        ),
        ("models:\n  - deployments: []\n", "models[0].name is required"),
    ],
)
def test_a_bad_value_deep_in_a_nested_section_is_named_by_its_path(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = Path(config_file(tmp_path, text))

    with pytest.raises(ConfigError) as raised:
        build(Routed, file_layer(path, ["port", "models"]))

    assert str(raised.value) == f"{expected} (from models in {path})"


# --- secrets: from variables and key files only ------------------------------------------------


def test_caller_keys_are_split_on_commas_with_blanks_dropped() -> None:
    settings = load(RERANK_API_KEYS=" k1 ,, k2,  ,k3", RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY)

    assert revealed(settings.api_keys) == ["k1", "k2", "k3"]
    assert settings.sources["api_keys"] == "RERANK_API_KEYS"


def test_a_keys_file_holds_one_key_a_line_with_comments(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        "# callers\n\nkey-a\n   \n  key-b  \n  # key-c is retired\nkey-d\n", encoding="utf-8"
    )

    settings = load(RERANK_API_KEYS_FILE=str(keys_file), RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY)

    assert revealed(settings.api_keys) == ["key-a", "key-b", "key-d"]
    assert settings.sources["api_keys"] == "RERANK_API_KEYS_FILE"


def test_a_keys_file_line_with_a_comment_after_its_key_is_refused_naming_the_line(tmp_path: Path) -> None:
    """As a caller's key_file: the comment would become part of the key, never sent."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("key-a\nkey-b  # the batch team\n", encoding="utf-8")

    message = refusal(RERANK_API_KEYS_FILE=str(keys_file), RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY)

    assert message.startswith(f"api-keys-file {keys_file}: line 2 holds a space")


def test_caller_keys_come_from_the_file_flag_then_the_variables_then_the_config_file(tmp_path: Path) -> None:
    for name in ("flag", "env-file", "config"):
        (tmp_path / name).write_text(f"from-{name}\n", encoding="utf-8")
    path = config_file(tmp_path, f"api_keys_file: {tmp_path / 'config'}\n")
    up = {"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}

    def keys(args: dict[str, Any], /, **env: str) -> list[str]:
        return revealed(load({"config": path, **args}, **up, **env).api_keys)

    everything = {"RERANK_API_KEYS": "from-env", "RERANK_API_KEYS_FILE": str(tmp_path / "env-file")}
    assert keys({"api_keys_file": str(tmp_path / "flag")}, **everything) == ["from-flag"]
    assert keys({}, **everything) == ["from-env"]
    # Empty counts as unset; blanks alone do not (tests/unit/test_blank_key_sources.py).
    assert keys({}, RERANK_API_KEYS="", RERANK_API_KEYS_FILE=str(tmp_path / "env-file")) == ["from-env-file"]
    assert keys({}) == ["from-config"]
    assert load({"config": path}, **up).sources["api_keys"] == f"api_keys_file in {path}"


def test_the_upstream_key_comes_from_its_variable_then_its_file_then_dashscope_api_key(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "upstream-key"
    key_file.write_text(f"{UPSTREAM_KEY}\n", encoding="utf-8")

    def key(args: dict[str, Any] | None = None, /, **env: str) -> tuple[str, str]:
        settings = load(args, **env)
        assert settings.upstream_api_key is not None
        return settings.upstream_api_key.reveal(), settings.sources["upstream_api_key"]

    assert key({"upstream_api_key_file": str(key_file)}, RERANK_UPSTREAM_API_KEY="sk-env") == (
        UPSTREAM_KEY,
        "--upstream-api-key-file",
    )
    assert key(RERANK_UPSTREAM_API_KEY=" sk-env\n", DASHSCOPE_API_KEY="sk-ds") == (
        "sk-env",
        "RERANK_UPSTREAM_API_KEY",
    )
    assert key(RERANK_UPSTREAM_API_KEY_FILE=str(key_file), DASHSCOPE_API_KEY="sk-ds") == (
        UPSTREAM_KEY,
        "RERANK_UPSTREAM_API_KEY_FILE",
    )
    assert key(RERANK_UPSTREAM_API_KEY="", DASHSCOPE_API_KEY="sk-ds") == ("sk-ds", "DASHSCOPE_API_KEY")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ({}, {"RERANK_API_KEYS": " , ,"}, "RERANK_API_KEYS is set but holds no key"),
        ({}, {"RERANK_API_KEYS_FILE": "{comments}"}, "RERANK_API_KEYS_FILE is set but holds no key"),
        ({"upstream_api_key_file": "{empty}"}, {}, "--upstream-api-key-file is set but holds no key"),
        (
            {},
            {"RERANK_UPSTREAM_API_KEY_FILE": "{empty}"},
            "RERANK_UPSTREAM_API_KEY_FILE is set but holds no key",
        ),
        ({}, {"RERANK_API_KEYS_FILE": "{absent}"}, "api-keys-file {absent}: No such file or directory"),
        ({"api_keys_file": "{absent}"}, {}, "api-keys-file {absent}: No such file or directory"),
        ({}, {"RERANK_UPSTREAM_API_KEY_FILE": "{absent}"}, "upstream-api-key-file {absent}: No such file"),
    ],
)
def test_a_key_source_that_is_set_but_gives_no_key_is_refused_rather_than_switching_auth_off(
    tmp_path: Path, args: dict[str, str], env: dict[str, str], message: str
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n\n", encoding="utf-8")
    comments = tmp_path / "comments"
    comments.write_text("# nobody yet\n\n", encoding="utf-8")
    paths = {"empty": str(empty), "comments": str(comments), "absent": str(tmp_path / "absent")}
    args = {name: value.format(**paths) for name, value in args.items()}
    env = {name: value.format(**paths) for name, value in env.items()}

    assert refusal(args, **env).startswith(message.format(**paths))


def test_no_keys_anywhere_means_callers_tokens_pass_through() -> None:
    upstream = {"backend": "upstream"}
    assert load(upstream).pass_through
    assert load(upstream, RERANK_API_KEYS="").pass_through
    assert not load(upstream, DASHSCOPE_API_KEY=UPSTREAM_KEY).pass_through
    assert not load(upstream, RERANK_API_KEYS=CALLER_KEY, DASHSCOPE_API_KEY=UPSTREAM_KEY).pass_through


def test_local_models_without_keys_are_open_not_pass_through() -> None:
    """A local model takes no key: were tokens passed through, each token a client sent would
    be a caller of its own (its own label, its own fair share of the slots)."""
    assert not load().pass_through
    assert not load({"backend": "local"}).pass_through


def test_secrets_lists_the_caller_keys_then_the_upstream_key() -> None:
    settings = load(RERANK_API_KEYS="c1,c2", RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY)

    assert [secret.reveal() for secret in settings.secrets()] == ["c1", "c2", UPSTREAM_KEY]


def test_str_and_repr_of_settings_never_contain_a_key(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("file-caller-key-xyz\n", encoding="utf-8")
    from_env = load(RERANK_API_KEYS=f"{CALLER_KEY},env-caller-key-def", DASHSCOPE_API_KEY=UPSTREAM_KEY)
    from_file = load({"api_keys_file": str(keys_file)}, RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY)

    for settings in (from_env, from_file):
        for rendered in (str(settings), repr(settings), f"{settings}", f"{settings!r}"):
            for value in (UPSTREAM_KEY, CALLER_KEY, "env-caller-key-def", "file-caller-key-xyz"):
                assert value not in rendered
            assert "**********" in rendered


def test_no_configuration_error_ever_shows_a_key(tmp_path: Path) -> None:
    keys = {"RERANK_API_KEYS": CALLER_KEY, "DASHSCOPE_API_KEY": UPSTREAM_KEY}
    messages = [
        refusal(RERANK_PORT="x", **keys),
        refusal({"config": config_file(tmp_path, f"upstream_api_key: {UPSTREAM_KEY}\n")}, **keys),
        refusal(RERANK_API_KEYS=CALLER_KEY, RERANK_BACKEND="upstream"),
    ]
    with pytest.raises(ValidationError) as direct:
        Settings(upstream_api_key=UPSTREAM_KEY)  # type: ignore[arg-type]
    messages.append(str(direct.value))

    for message in messages:
        assert UPSTREAM_KEY not in message
        assert CALLER_KEY not in message


# --- settings that are each fine but wrong together ---------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RERANK_TLS_CERT": "cert.pem"}, "tls-cert and tls-key go together"),
        ({"RERANK_TLS_KEY": "key.pem"}, "tls-cert and tls-key go together"),
        ({"RERANK_TLS_CLIENT_CA": "ca.pem"}, "tls-client-ca requires tls-cert"),
        ({"RERANK_API_KEYS": CALLER_KEY, "RERANK_BACKEND": "upstream"}, "set RERANK_UPSTREAM_API_KEY"),
        ({"RERANK_LOCAL_QUANTIZE": "int8"}, "local-quantize int8 needs local-engine onnx"),
        ({"RERANK_LOCAL_ENGINE": "onnx", "RERANK_DEVICE": "cuda"}, "local-engine onnx runs on the CPU"),
        (
            {"RERANK_LOCAL_ENGINE": "onnx", "RERANK_DTYPE": "bfloat16"},
            "dtype bfloat16 needs local-engine torch",
        ),
    ],
)
def test_inconsistent_settings_are_refused(env: dict[str, str], message: str) -> None:
    assert message in refusal(**env)


def test_caller_keys_without_an_upstream_key_are_fine_for_the_local_backend() -> None:
    settings = load(RERANK_API_KEYS=CALLER_KEY)

    assert (settings.backend, revealed(settings.api_keys)) == ("local", [CALLER_KEY])


def grpc_config(**settings: Any) -> GrpcConfig:
    return ServerConfig.from_settings(Settings(**settings)).grpc


def test_grpc_options_bound_messages_and_keep_connections_alive() -> None:
    options = dict(
        channel_options(grpc_config(max_message_bytes=1234, keepalive_time=60, max_connection_age=300))
    )
    assert options["grpc.max_receive_message_length"] == 1234
    assert options["grpc.max_send_message_length"] == 1234
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert "grpc.max_connection_age_ms" not in dict(channel_options(grpc_config(max_connection_age=0)))


# Settings grpc's C core takes as C ints (seconds as milliseconds), at their largest.
GRPC_BOUNDS = {
    "RERANK_MAX_CONNECTIONS": "2147483647",
    "RERANK_MAX_STREAMS_PER_CONNECTION": "2147483647",
    "RERANK_MAX_MESSAGE_BYTES": "2147483647",
    "RERANK_HANDSHAKE_TIMEOUT": "2000000",
    "RERANK_KEEPALIVE_TIME": "2000000",
    "RERANK_KEEPALIVE_TIMEOUT": "2000000",
    "RERANK_MAX_CONNECTION_AGE": "2000000",
    "RERANK_MAX_CONNECTION_AGE_GRACE": "2000000",
}


@pytest.mark.parametrize("variable", sorted(GRPC_BOUNDS))
def test_a_grpc_setting_past_what_grpc_takes_is_refused_and_at_its_bound_grpc_takes_it(variable: str) -> None:
    largest = GRPC_BOUNDS[variable]
    past = str(int(float(largest)) + 1)
    room = {"RERANK_MAX_INFLIGHT_BYTES": str(2**32)}  # above the largest message, as it must be
    flag = variable.removeprefix("RERANK_").lower().replace("_", "-")

    assert refusal(**{variable: past}, **room).startswith(f"{flag} must be ")
    build_grpc_server(load(**{variable: largest}, **room))


def build_grpc_server(settings: Settings) -> None:
    """grpc.aio's server with `settings`' options and limit on open calls, as api/grpc/server.py
    builds it: grpc raises OverflowError on any past a C int."""
    config = ServerConfig.from_settings(settings).grpc
    limits = config.side_calls
    open_calls = config.max_open_calls + limits.max_health_checks + limits.max_watch_streams

    async def build() -> None:
        grpc.aio.server(options=channel_options(config), maximum_concurrent_rpcs=open_calls)

    asyncio.run(build())


def test_open_calls_up_to_grpcs_limit_are_taken_and_past_it_refused() -> None:
    side_calls = {"RERANK_MAX_HEALTH_CHECKS": "1", "RERANK_MAX_WATCH_STREAMS": "1"}
    build_grpc_server(load(RERANK_MAX_OPEN_CALLS="2147483645", **side_calls))
    message = refusal(RERANK_MAX_OPEN_CALLS="2147483646", **side_calls)

    assert message == (
        "max-open-calls, max-health-checks and max-watch-streams add up to 2147483648: "
        "grpc's limit on open calls is at most 2147483647"
    )


def test_workers_auto_is_one_per_usable_core_and_a_number_is_taken_as_is() -> None:
    assert load({"workers": "auto"}).workers == usable_cores()
    assert load(RERANK_WORKERS="AUTO").workers == usable_cores()
    assert load(RERANK_WORKERS="3").workers == 3
    assert load().workers == 1
    for bad in ("0", "many"):
        assert refusal(RERANK_WORKERS=bad) == (
            f"workers must be an integer from 1 to 4096, or auto, got '{bad}' (from RERANK_WORKERS)"
        )


@pytest.mark.parametrize(
    ("files", "own", "cores"),
    [
        ({"cpu.max": "150000 100000\n"}, "0::/\n", 2),  # a Kubernetes limit of 1.5 CPUs
        ({"cpu.max": "max 100000\n"}, "0::/\n", None),  # no limit: the cores it may run on
        # systemd's CPUQuota=50% on the service: its own cgroup, not the hierarchy's root
        ({"system.slice/r.service/cpu.max": "50000 100000\n"}, "0::/system.slice/r.service\n", 1),
        # a quota on a slice above the service, none on the service itself
        (
            {"a.slice/cpu.max": "100000 100000\n", "a.slice/r.service/cpu.max": "max 100000\n"},
            "0::/a.slice/r.service\n",
            1,
        ),
        # the cgroup /proc/self/cgroup names is not mounted here (a container without its own
        # cgroup namespace): the root's quota holds
        ({"cpu.max": "100000 100000\n"}, "0::/docker/abc\n", 1),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "", 1),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "", None),
        (
            {"cpu/u.slice/cpu.cfs_quota_us": "100000\n", "cpu/u.slice/cpu.cfs_period_us": "100000\n"},
            "4:cpu,cpuacct:/u.slice\n1:name=systemd:/u.slice\n",
            1,
        ),
        ({}, None, None),  # no cgroup files (macOS)
    ],
    ids=[
        "v2-limit",
        "v2-none",
        "v2-systemd-service",
        "v2-slice-above",
        "v2-not-mounted",
        "v1-limit",
        "v1-none",
        "v1-own-cgroup",
        "none",
    ],
)
def test_usable_cores_are_lowered_to_the_cgroups_cpu_limit(
    tmp_path: Path, files: dict[str, str], own: str | None, cores: int | None
) -> None:
    """`--workers auto` in a pod or a systemd service: the affinity names every core of the
    machine, the limit is in the process's cgroup or one above it."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    if own is not None:
        proc.write_text(own)
    every_core = len(os.sched_getaffinity(0))

    assert usable_cores(str(root), str(proc)) == (every_core if cores is None else min(cores, every_core))


# --- keys pasted in the wrong place, and paths the OS cannot open -------------------------------

PASTED_KEY = "sk-live-9f86d081884c7d659a2f"
CALLER_A = "callers:\n  - name: a\n  "


@pytest.mark.parametrize(
    ("env", "text", "expected"),
    [
        ({"RERANK_UPSTREAM_API_KEY_FILE": PASTED_KEY}, "", "upstream-api-key-file (a relative path"),
        ({"RERANK_API_KEYS_FILE": PASTED_KEY}, "", "api-keys-file (a relative path"),
        ({}, f"upstream_api_key_file: {PASTED_KEY}\n", "upstream-api-key-file (a relative path"),
        (
            {},
            f"models:\n  - name: m\n    deployments:\n      - url: http://127.0.0.1:9\n"
            f"        format: dashscope\n        api_key_file: {PASTED_KEY}\n",
            "models[0].deployments[0].api_key_file (a relative path",
        ),
        ({}, f"{CALLER_A}  credentials: [{{key_file: {PASTED_KEY}}}]\n", "key_file (a relative"),
        ({}, f"{CALLER_A}  credentials: {PASTED_KEY}\n", "callers[0].credentials must be "),
        ({}, f"{CALLER_A}  credentials: [{PASTED_KEY}]\n", "callers[0].credentials[0] must be "),
        ({}, f"{CALLER_A}  credentials: {{key: {PASTED_KEY}}}\n", "callers[0].credentials must be "),
    ],
)
def test_a_key_pasted_where_its_file_or_the_credentials_go_is_never_repeated(
    tmp_path: Path, env: dict[str, str], text: str, expected: str
) -> None:
    if text:
        env = {**env, "RERANK_CONFIG": config_file(tmp_path, text)}
    message = refusal(RERANK_BACKEND="upstream", RERANK_UPSTREAM_URL="http://127.0.0.1:9", **env)

    assert expected in message
    assert PASTED_KEY not in message


def test_a_key_file_variable_that_cannot_be_read_names_the_variable(tmp_path: Path) -> None:
    absent = tmp_path / "absent"

    assert refusal(RERANK_API_KEYS_FILE=str(absent)) == (
        f"api-keys-file {absent}: No such file or directory (from RERANK_API_KEYS_FILE)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('usage_log: "/tmp/log\\0x"\n', "usage-log must be a path without NUL bytes"),
        ('upstream_ca_file: "/tmp/ca\\0x"\n', "upstream-ca-file must be a path without NUL bytes"),
        ('tls_cert: "/tmp/c\\0x"\ntls_key: /tmp/k\n', "tls-cert must be a path without NUL bytes"),
        ('upstream_api_key_file: "/tmp/k\\0x"\n', "upstream-api-key-file (a relative path, not repeated): "),
        (
            "models:\n  - name: m\n    deployments:\n      - url: https://127.0.0.1:9\n"
            '        format: dashscope\n        ca_file: "/tmp/ca\\0x"\n',
            "models[0].deployments[0].ca_file must be a path without NUL bytes",
        ),
        (
            "models:\n  - name: m\n    deployments:\n      - url: http://127.0.0.1:9\n"
            '        format: dashscope\n        api_key_file: "/tmp/k\\0x"\n',
            "models[0].deployments[0].api_key_file (a relative path, not repeated): not a file path",
        ),
        (
            'callers:\n  - name: a\n    credentials: [{key_file: "/tmp/k\\0x"}]\n',
            "callers[0].credentials[0].key_file (a relative path, not repeated): not a file path",
        ),
    ],
)
def test_a_path_with_a_nul_byte_is_refused_naming_the_setting(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = refusal(
        RERANK_CONFIG=config_file(tmp_path, text + "backend: upstream\nupstream_url: http://127.0.0.1:9\n")
    )

    assert message.startswith(expected)


@pytest.mark.parametrize("off", ["off", "OFF", " Off "])
def test_usage_log_off_is_no_usage_log_from_a_variable_a_flag_and_the_file(tmp_path: Path, off: str) -> None:
    assert load(RERANK_USAGE_LOG=off).usage_log is None
    assert load({"usage_log": off}).usage_log is None
    assert load(RERANK_CONFIG=config_file(tmp_path, f"usage_log: {off}\n")).usage_log is None
    assert load(RERANK_USAGE_LOG="STDOUT").usage_log == "stdout"
    assert load(RERANK_USAGE_LOG="./off").usage_log == "./off"  # a file named off


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("port: on\n", "port"),
        ("metrics_port: on\n", "metrics-port"),
        ("http_port: yes\n", "http-port"),
        ("max_concurrent_requests: true\n", "max-concurrent-requests"),
        ("upstream_timeout: true\n", "upstream-timeout"),
        ("max_message_bytes: yes\n", "max-message-bytes"),
        ("workers: on\n", "workers"),
    ],
)
def test_a_yaml_switch_where_a_number_goes_is_refused_not_read_as_1(
    tmp_path: Path, text: str, setting: str
) -> None:
    message = refusal(RERANK_CONFIG=config_file(tmp_path, text))

    assert message.startswith(f"{setting} must be a number, not a switch")


def test_metrics_port_off_in_the_file_is_still_off(tmp_path: Path) -> None:
    assert load(RERANK_CONFIG=config_file(tmp_path, "metrics_port: off\n")).metrics_port is None


def test_a_setting_written_twice_in_the_file_is_refused_naming_its_line(tmp_path: Path) -> None:
    path = config_file(tmp_path, "callers: []\nbackend: upstream\ncallers: []\n")

    assert refusal(RERANK_CONFIG=path) == (
        f"config {path}: not valid YAML: 'callers' is written twice in one mapping at line 3, column 1"
    )


def test_a_key_written_twice_inside_a_section_is_refused_and_yaml_merges_still_load(tmp_path: Path) -> None:
    twice = config_file(tmp_path, "models:\n  - name: m\n    name: n\n", "twice.yaml")
    merged = config_file(
        tmp_path,
        "backend: upstream\nmodels:\n  - name: m\n    deployments:\n"
        "      - &first {url: 'http://127.0.0.1:9', format: dashscope, name: a}\n"
        "      - <<: *first\n        url: 'http://127.0.0.1:10'\n        name: b\n",
        "merged.yaml",
    )

    assert "'name' is written twice in one mapping at line 3" in refusal(RERANK_CONFIG=twice)
    deployments = load(RERANK_CONFIG=merged).models[0].deployments
    assert [(d.name, d.url, d.format) for d in deployments] == [
        ("a", "http://127.0.0.1:9", "dashscope"),
        ("b", "http://127.0.0.1:10", "dashscope"),
    ]


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ("        timeout: true\n", "models[0].deployments[0].timeout"),
        ("        priority: on\n", "models[0].deployments[0].priority"),
        ("        weight: yes\n", "models[0].deployments[0].weight"),
        ("        documents_per_call: on\n", "models[0].deployments[0].documents_per_call"),
    ],
)
def test_a_yaml_switch_where_a_deployment_takes_a_number_is_refused(
    tmp_path: Path, entry: str, where: str
) -> None:
    text = (
        "backend: upstream\nmodels:\n  - name: m\n    deployments:\n"
        "      - url: http://127.0.0.1:9\n        format: dashscope\n" + entry
    )

    assert refusal(RERANK_CONFIG=config_file(tmp_path, text)).startswith(
        f"{where} must be a number, not a switch"
    )


# --- bounds past which a value breaks what it ends in -------------------------------------------


@pytest.mark.parametrize("setting", ["max_documents", "max_query_tokens"])
def test_a_count_listmodels_sends_as_int32_is_refused_past_it(setting: str) -> None:
    """ListModels sends them in the contract's int32 fields: past it protobuf refused the answer
    (INTERNAL "Value out of range") of a server that had started."""
    variable = f"RERANK_{setting.upper()}"
    largest = load(**{variable: str(2**31 - 1)})
    rerank_pb2.ModelInfo(**{setting: getattr(largest, setting)})  # within int32

    assert refusal(**{variable: str(2**31)}).startswith(
        f"{setting.replace('_', '-')} must be an integer from 1 to 2147483647, got '2147483648'"
    )


@pytest.mark.parametrize(
    ("variable", "at_least"),
    [
        ("RERANK_UPSTREAM_BREAKER_COOLDOWN", "> 0"),
        ("RERANK_UPSTREAM_TIMEOUT", "> 0"),
        ("RERANK_CACHE_TTL", "> 0"),
        ("RERANK_DRAIN_DELAY", ">= 0"),
    ],
)
def test_seconds_past_a_year_are_refused(variable: str, at_least: str) -> None:
    """A cool-down of 1e300 s was taken, then every refusal of the down deployment failed
    (UNKNOWN "Value out of range") building its RetryInfo."""
    setting = variable.removeprefix("RERANK_").lower()

    assert getattr(load(**{variable: "31536000"}), setting) == 31_536_000
    assert refusal(**{variable: "1e300"}).startswith(
        f"{setting.replace('_', '-')} must be a finite number of seconds {at_least}, at most 31,536,000 "
        "(a year), got '1e300'"
    )


def test_the_breaker_window_is_at_most_an_hour() -> None:
    """Counted in slots (core/window.py): 1e12 s was a MemoryError at start."""
    assert load(RERANK_UPSTREAM_BREAKER_WINDOW="3600").upstream_breaker_window == 3600
    assert refusal(RERANK_UPSTREAM_BREAKER_WINDOW="1e12").startswith(
        "upstream-breaker-window must be a finite number of seconds > 0, at most 3600, got '1e12'"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RERANK_PORT": "7000", "RERANK_HTTP_PORT": "7000"}, "port and http-port are both 7000"),
        ({"RERANK_PORT": "7000", "RERANK_METRICS_PORT": "7000"}, "port and metrics-port are both 7000"),
        (
            {"RERANK_HTTP_PORT": "7001", "RERANK_METRICS_PORT": "7001"},
            "http-port and metrics-port are both 7001",
        ),
    ],
)
def test_two_ports_of_one_number_are_refused(env: dict[str, str], message: str) -> None:
    """serve could listen on only one of them: it exited 1 ("cannot start") after check-config said ok."""
    assert refusal(**env) == f"{message}: each port serves one thing"


def test_ports_picked_by_the_system_may_all_be_0() -> None:
    settings = load(RERANK_PORT="0", RERANK_HTTP_PORT="0", RERANK_METRICS_PORT="0")

    assert (settings.port, settings.http_port, settings.metrics_port) == (0, 0, 0)


def test_the_host_is_trimmed_and_a_blank_one_refused(tmp_path: Path) -> None:
    assert load({"config": config_file(tmp_path, "host: ' 127.0.0.1 '\n")}).host == "127.0.0.1"
    for text in ("host: ' '\n", "host: 'local host'\n"):
        assert refusal({"config": config_file(tmp_path, text)}).startswith(
            "host must be a host name or address"
        )


@pytest.mark.parametrize("store", ["cache_store", "limits_store"])
@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("?socket_timeout=5", "socket_timeout"),
        (f"?password={URL_SECRET}&db=2", "db, password"),
        ("?protocol=3&ssl_check_hostname=false", "protocol"),
        ("?ssl_ca_certs=/etc/other.pem", "ssl_ca_certs"),  # over --*-store-ca-file
        # No options for this client: each connection then failed, for good.
        ("?decode_responses=true", "decode_responses"),
        ("?foo=bar", "foo"),
        ("?SOCKET_TIMEOUT=0.05", "SOCKET_TIMEOUT"),
    ],
    ids=["the-timeout", "password-and-database", "protocol", "ca-file", "decoding", "unknown", "upper-case"],
)
def test_a_store_url_whose_query_overrides_the_services_options_is_refused_naming_them(
    store: str, query: str, named: str
) -> None:
    """redis-py takes a query's options over the client's own: a socket_timeout there replaced
    the store's timeout. The URL is not repeated."""
    flag = store.replace("_", "-")
    message = refusal(**{f"RERANK_{store.upper()}": f"rediss://:{URL_SECRET}@redis.internal:6379/0{query}"})

    assert message.startswith(f"{flag} must not set {named} in its query, which takes redis-py's TLS"), (
        message
    )
    assert f"the store's timeout is {flag}-timeout, its CA bundle {flag}-ca-file" in message
    assert URL_SECRET not in message


def test_tls_options_of_a_plain_redis_url_are_refused() -> None:
    """redis-py hands them to a plain connection, which then never opened."""
    assert refusal(RERANK_CACHE_STORE="redis://redis.internal:6379/0?ssl_check_hostname=false").startswith(
        "cache-store sets TLS options in its query: they need a rediss:// URL"
    )


def test_a_store_url_whose_query_redis_cannot_read_is_refused_at_load() -> None:
    """It passed check-config, then failed serve with a traceback."""
    message = refusal(RERANK_CACHE_STORE="redis://redis.internal:6379/0?health_check_interval=abc")

    assert message.startswith(
        "cache-store has a query redis cannot read (Invalid value for 'health_check_interval' in "
        "connection URL.)"
    ), message


@pytest.mark.parametrize(
    "url",
    [
        "redis://redis.internal",
        "redis://redis.internal/",
        "redis://h:6379/12",
        "rediss://:p@h:6380/0",
        # TLS options no setting of the service says: the URL's to say.
        "rediss://h:6380/0?ssl_check_hostname=false",
        "rediss://h:6380/0?ssl_cert_reqs=none",
    ],
)
def test_a_store_url_is_taken_with_its_tls_options(url: str) -> None:
    assert load(RERANK_CACHE_STORE=url).cache_store == url


def test_a_store_url_whose_path_is_no_database_number_is_refused() -> None:
    """redis-py reads such a path as database 0, silently."""
    assert refusal(RERANK_LIMITS_STORE="redis://redis.internal:6379/cache").startswith(
        "limits-store has a path that is no database number (/0, /1, ...), got "
        "'redis://redis.internal:6379/cache'"
    )


def build_store(store: str, url: str, ca_file: Path | None = None) -> None:
    """The cache's or the limits' Redis store as serve builds it (its client connects later)."""
    if store == "cache":
        build_score_cache(CacheConfig(0, 60.0, url, 0.05, ca_file))
    else:
        build_limiter(LimitsStoreConfig(url, True, 0.05, ca_file), CallerMetrics(CollectorRegistry()))


@pytest.mark.parametrize("store", ["cache", "limits"])
def test_a_store_ca_file_holding_no_certificate_stops_the_store_being_built(
    tmp_path: Path, store: str
) -> None:
    """Read only for readability, a key file given as the CA was taken: the store then never
    connected (with limits-store-failure closed, every limited caller's call refused)."""
    authority = CertificateAuthority()
    ca = authority.write(tmp_path)
    _, key = authority.issue_server().write(tmp_path, "redis")

    build_store(store, "rediss://127.0.0.1:9/0", ca)
    with pytest.raises(ConfigError) as raised:
        build_store(store, "rediss://127.0.0.1:9/0", key)

    assert str(raised.value) == f"{store}-store-ca-file {key}: holds no valid PEM certificate"


@pytest.mark.parametrize("store", ["cache", "limits"])
def test_a_store_url_redis_cannot_read_is_a_configuration_error_naming_the_setting(store: str) -> None:
    """Past the settings' own check (Settings refuses a query): never a traceback from serve."""
    with pytest.raises(ConfigError) as raised:
        build_store(store, "redis://127.0.0.1:9/0?socket_timeout=abc")

    assert str(raised.value) == f"{store}-store: Invalid value for 'socket_timeout' in connection URL."


def test_a_batch_wait_past_a_second_is_refused_naming_the_setting() -> None:
    """A wait that long is no batching window: a call smaller than a batch would sit it out,
    or to its deadline (one without a deadline, for good)."""
    assert load(RERANK_BATCH_WAIT_MS="1000").batch_wait_ms == 1000
    assert refusal(RERANK_BATCH_WAIT_MS="1000000000000").startswith("batch-wait-ms must be ")
