"""load_settings: precedence, validation, key parsing and secrecy of Settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rerank_service.config.secret import Secret
from rerank_service.config.settings import DEFAULT_UPSTREAM_URL, ConfigError, Settings, load_settings
from rerank_service.grpc.server import channel_options

UPSTREAM_KEY = "sk-upstream-0123456789"


def load(args: dict[str, Any] | None = None, **env: str) -> Settings:
    """load_settings with an explicit environment, never the process's own."""
    return load_settings(args or {}, env)


def revealed(secrets: tuple[Secret, ...]) -> list[str]:
    return [secret.reveal() for secret in secrets]


# --- precedence ---------------------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_set() -> None:
    settings = load()
    assert settings == Settings()
    assert settings.port == 50051
    assert settings.upstream_url == DEFAULT_UPSTREAM_URL
    assert settings.upstream_dialect == "dashscope"
    assert settings.upstream_models == ("qwen3-rerank",)
    assert settings.api_keys == ()
    assert settings.upstream_api_key is None
    assert dict(settings.sources) == {}


def test_env_overrides_default() -> None:
    settings = load(RERANK_PORT="6000", RERANK_UPSTREAM_DIALECT="compatible")
    assert settings.port == 6000
    assert settings.upstream_dialect == "compatible"
    assert settings.sources["port"] == "RERANK_PORT"


def test_flag_overrides_env() -> None:
    settings = load({"port": "7000"}, RERANK_PORT="6000")
    assert settings.port == 7000
    assert settings.sources["port"] == "--port"


def test_flag_set_to_none_falls_back_to_env() -> None:
    # argparse leaves unset flags as None.
    settings = load({"port": None, "upstream_timeout": None}, RERANK_PORT="6000")
    assert settings.port == 6000
    assert settings.upstream_timeout == 30.0


def test_flag_values_that_are_not_strings_are_accepted() -> None:
    settings = load({"port": 8080, "upstream_timeout": 2.5})
    assert settings.port == 8080
    assert settings.upstream_timeout == 2.5


def test_every_plain_setting_is_read_from_its_env_variable() -> None:
    settings = load(
        RERANK_HOST="127.0.0.1",
        RERANK_PORT="1234",
        RERANK_BACKEND="upstream",
        RERANK_UPSTREAM_URL="http://localhost:8080/",
        RERANK_UPSTREAM_DIALECT="compatible",
        RERANK_UPSTREAM_MODELS="a,b",
        RERANK_UPSTREAM_TIMEOUT="1.5",
        RERANK_UPSTREAM_MAX_CONNECTIONS="8",
        RERANK_MAX_DOCUMENTS="10",
        RERANK_MAX_QUERY_TOKENS="100",
        RERANK_LOG_FORMAT="json",
        RERANK_LOG_LEVEL="debug",
        RERANK_SHUTDOWN_GRACE="2",
    )
    assert settings == Settings(
        host="127.0.0.1",
        port=1234,
        backend="upstream",
        upstream_url="http://localhost:8080",
        upstream_dialect="compatible",
        upstream_models=("a", "b"),
        upstream_timeout=1.5,
        upstream_max_connections=8,
        max_documents=10,
        max_query_tokens=100,
        log_format="json",
        log_level="debug",
        shutdown_grace=2.0,
    )


def test_choices_are_case_insensitive_and_trimmed() -> None:
    settings = load(RERANK_UPSTREAM_DIALECT=" Compatible ", RERANK_LOG_LEVEL="WARNING")
    assert settings.upstream_dialect == "compatible"
    assert settings.log_level == "warning"


def test_upstream_url_trailing_slash_is_removed() -> None:
    assert load(RERANK_UPSTREAM_URL="https://example.com/base/").upstream_url == "https://example.com/base"


# --- ConfigError cases --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RERANK_UPSTREAM_DIALECT": "openai"}, "upstream-dialect"),
        ({"RERANK_BACKEND": "quantum"}, "backend"),
        ({"RERANK_PORT": "65536"}, "port"),
        ({"RERANK_PORT": "-1"}, "port"),
        ({"RERANK_PORT": "http"}, "port must be an integer"),
        ({"RERANK_PORT": "80.5"}, "port must be an integer"),
        ({"RERANK_UPSTREAM_URL": "ftp://x"}, "upstream-url"),
        ({"RERANK_UPSTREAM_URL": "not a url"}, "upstream-url"),
        ({"RERANK_UPSTREAM_URL": "https://"}, "upstream-url"),
        ({"RERANK_UPSTREAM_URL": "http://host:99999"}, "upstream-url has an invalid port"),
        ({"RERANK_UPSTREAM_TIMEOUT": "0"}, "upstream-timeout"),
        ({"RERANK_UPSTREAM_TIMEOUT": "-3"}, "upstream-timeout"),
        ({"RERANK_UPSTREAM_TIMEOUT": "soon"}, "upstream-timeout"),
        ({"RERANK_UPSTREAM_TIMEOUT": "nan"}, "upstream-timeout"),
        ({"RERANK_SHUTDOWN_GRACE": "0"}, "shutdown-grace"),
        ({"RERANK_MAX_DOCUMENTS": "0"}, "max-documents"),
        ({"RERANK_MAX_DOCUMENTS": "many"}, "max-documents must be an integer"),
        ({"RERANK_MAX_QUERY_TOKENS": "-5"}, "max-query-tokens"),
        ({"RERANK_UPSTREAM_MAX_CONNECTIONS": "0"}, "upstream-max-connections"),
        ({"RERANK_LOG_FORMAT": "xml"}, "log-format"),
        ({"RERANK_LOG_LEVEL": "trace"}, "log-level"),
        ({"RERANK_UPSTREAM_MODELS": " , ,"}, "upstream-models"),
    ],
)
def test_invalid_value_raises_config_error_naming_the_setting(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings({}, env)


def test_invalid_flag_raises_config_error_too() -> None:
    with pytest.raises(ConfigError, match="port"):
        load({"port": "seventy"})


def test_an_invalid_env_value_is_not_checked_when_a_flag_overrides_it() -> None:
    assert load({"port": "1"}, RERANK_PORT="nonsense").port == 1


@pytest.mark.parametrize("port", ["0", "65535"])
def test_port_bounds_are_inclusive(port: str) -> None:
    assert load(RERANK_PORT=port).port == int(port)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- upstream models ----------------------------------------------------------------------------


def test_upstream_models_are_split_trimmed_and_deduplicated_in_order() -> None:
    settings = load(RERANK_UPSTREAM_MODELS=" qwen3-rerank, ,gte-rerank-v2,,qwen3-rerank , extra ")
    assert settings.upstream_models == ("qwen3-rerank", "gte-rerank-v2", "extra")


def test_a_single_upstream_model_is_accepted() -> None:
    assert load({"upstream_models": "gte-rerank-v2"}).upstream_models == ("gte-rerank-v2",)


# --- caller keys --------------------------------------------------------------------------------


def test_api_keys_are_split_on_commas_and_blanks_dropped() -> None:
    settings = load(RERANK_API_KEYS=" k1 ,, k2,  ,k3", RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY)
    assert revealed(settings.api_keys) == ["k1", "k2", "k3"]
    assert settings.sources["api_keys"] == "RERANK_API_KEYS"


def test_api_keys_file_ignores_comments_and_blank_lines(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        "# callers\n\nkey-a\n   \n  key-b  \n  # key-c is retired\nkey-d\n", encoding="utf-8"
    )
    settings = load(RERANK_API_KEYS_FILE=str(keys_file), RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY)
    assert revealed(settings.api_keys) == ["key-a", "key-b", "key-d"]
    assert settings.sources["api_keys"] == "RERANK_API_KEYS_FILE"


def test_api_keys_file_flag_wins_over_env(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("from-file\n", encoding="utf-8")
    settings = load(
        {"api_keys_file": str(keys_file)}, RERANK_API_KEYS="from-env", RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY
    )
    assert revealed(settings.api_keys) == ["from-file"]
    assert settings.sources["api_keys"] == "--api-keys-file"


def test_api_keys_env_wins_over_api_keys_file_env(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("from-file\n", encoding="utf-8")
    settings = load(
        RERANK_API_KEYS="from-env", RERANK_API_KEYS_FILE=str(keys_file), RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY
    )
    assert revealed(settings.api_keys) == ["from-env"]


def test_missing_api_keys_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api-keys-file"):
        load(RERANK_API_KEYS_FILE=str(tmp_path / "absent"), RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY)


def test_empty_api_keys_env_counts_as_unset() -> None:
    settings = load(RERANK_API_KEYS="")
    assert settings.api_keys == ()
    assert settings.pass_through


# --- upstream key -------------------------------------------------------------------------------


def test_upstream_key_is_read_and_trimmed() -> None:
    settings = load(RERANK_UPSTREAM_API_KEY=f"  {UPSTREAM_KEY}\n")
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.reveal() == UPSTREAM_KEY
    assert settings.sources["upstream_api_key"] == "RERANK_UPSTREAM_API_KEY"


def test_upstream_key_falls_back_to_dashscope_api_key() -> None:
    settings = load(DASHSCOPE_API_KEY="sk-dashscope")
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.reveal() == "sk-dashscope"
    assert settings.sources["upstream_api_key"] == "DASHSCOPE_API_KEY"


def test_rerank_upstream_api_key_wins_over_dashscope_api_key() -> None:
    settings = load(RERANK_UPSTREAM_API_KEY="sk-rerank", DASHSCOPE_API_KEY="sk-dashscope")
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.reveal() == "sk-rerank"


def test_upstream_key_file_is_read_and_trimmed(tmp_path: Path) -> None:
    key_file = tmp_path / "upstream-key"
    key_file.write_text(f"{UPSTREAM_KEY}\n", encoding="utf-8")
    settings = load({"upstream_api_key_file": str(key_file)}, DASHSCOPE_API_KEY="sk-dashscope")
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.reveal() == UPSTREAM_KEY
    assert settings.sources["upstream_api_key"] == "--upstream-api-key-file"


def test_missing_upstream_key_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="upstream-api-key-file"):
        load(RERANK_UPSTREAM_API_KEY_FILE=str(tmp_path / "absent"))


# --- consistency and pass-through ---------------------------------------------------------------


def test_api_keys_without_upstream_key_is_a_config_error_for_the_upstream_backend() -> None:
    with pytest.raises(ConfigError, match="RERANK_UPSTREAM_API_KEY"):
        load(RERANK_API_KEYS="caller-key", RERANK_BACKEND="upstream")


def test_api_keys_without_upstream_key_are_fine_for_the_local_backend() -> None:
    settings = load(RERANK_API_KEYS="caller-key")

    assert settings.backend == "local"
    assert revealed(settings.api_keys) == ["caller-key"]


def test_local_models_parse_as_name_source_pairs() -> None:
    settings = load(RERANK_LOCAL_MODELS=" qwen3-rerank=/models/Qwen3-Reranker-0.6B , mini=bundled ,")

    assert settings.local_models == (("qwen3-rerank", "/models/Qwen3-Reranker-0.6B"), ("mini", "bundled"))


@pytest.mark.parametrize("raw", ["no-equals-sign", "=bundled", "name=", "a=bundled,a=/x", " , "])
def test_malformed_local_models_are_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="local-models"):
        load(RERANK_LOCAL_MODELS=raw)


def test_the_default_backend_is_local_with_the_bundled_model() -> None:
    settings = load()

    assert settings.backend == "local"
    assert settings.local_models == (("all-minilm-l6-v2", "bundled"),)


def test_api_keys_with_dashscope_key_is_consistent() -> None:
    settings = load(RERANK_API_KEYS="caller-key", DASHSCOPE_API_KEY="sk-dashscope")
    assert revealed(settings.api_keys) == ["caller-key"]
    assert not settings.pass_through


def test_pass_through_only_without_any_key() -> None:
    assert Settings().pass_through
    assert not Settings(upstream_api_key=Secret(UPSTREAM_KEY)).pass_through
    assert not Settings(api_keys=(Secret("c"),), upstream_api_key=Secret(UPSTREAM_KEY)).pass_through
    assert not Settings(api_keys=(Secret("c"),)).pass_through


def test_secrets_lists_caller_keys_and_upstream_key() -> None:
    settings = Settings(api_keys=(Secret("c1"), Secret("c2")), upstream_api_key=Secret(UPSTREAM_KEY))
    assert [secret.reveal() for secret in settings.secrets()] == ["c1", "c2", UPSTREAM_KEY]
    assert Settings().secrets() == []


# --- secrecy ------------------------------------------------------------------------------------


def test_str_and_repr_of_settings_never_contain_key_values(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("file-caller-key-xyz\n", encoding="utf-8")
    from_env = load(RERANK_API_KEYS="env-caller-key-abc,env-caller-key-def", DASHSCOPE_API_KEY=UPSTREAM_KEY)
    from_file = load({"api_keys_file": str(keys_file)}, RERANK_UPSTREAM_API_KEY=UPSTREAM_KEY)
    for settings in (from_env, from_file):
        for rendered in (str(settings), repr(settings), f"{settings}", f"{settings!r}"):
            for value in (UPSTREAM_KEY, "env-caller-key-abc", "env-caller-key-def", "file-caller-key-xyz"):
                assert value not in rendered
            assert "**********" in rendered


@pytest.mark.parametrize("value", ["inf", "-inf", "1e400"])
def test_an_infinite_timeout_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="finite"):
        load(RERANK_UPSTREAM_TIMEOUT=value)


def test_an_empty_plain_variable_counts_as_unset() -> None:
    settings = load(RERANK_PORT="", RERANK_HOST="  ", RERANK_UPSTREAM_DIALECT="")

    assert (settings.port, settings.host, settings.upstream_dialect) == (50051, "0.0.0.0", "dashscope")


def test_api_keys_that_hold_no_key_are_refused_rather_than_switching_auth_off() -> None:
    with pytest.raises(ConfigError, match="RERANK_API_KEYS is set but holds no key"):
        load(RERANK_API_KEYS=" , ,", RERANK_UPSTREAM_API_KEY="up")


def test_an_api_keys_file_of_comments_only_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# nobody yet\n\n")

    with pytest.raises(ConfigError, match="RERANK_API_KEYS_FILE is set but holds no key"):
        load(RERANK_API_KEYS_FILE=str(keys), RERANK_UPSTREAM_API_KEY="up")


def test_a_blank_api_keys_variable_does_not_hide_the_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("from-file\n")

    settings = load(RERANK_API_KEYS=" ", RERANK_API_KEYS_FILE=str(keys), RERANK_UPSTREAM_API_KEY="up")

    assert revealed(settings.api_keys) == ["from-file"]
    assert settings.sources["api_keys"] == "RERANK_API_KEYS_FILE"


def test_a_blank_upstream_key_falls_back_to_dashscope_api_key() -> None:
    settings = load(RERANK_UPSTREAM_API_KEY="  ", DASHSCOPE_API_KEY="ds-key")

    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.reveal() == "ds-key"
    assert settings.sources["upstream_api_key"] == "DASHSCOPE_API_KEY"


def test_an_empty_upstream_key_file_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("\n")

    with pytest.raises(ConfigError, match="--upstream-api-key-file is set but holds no key"):
        load({"upstream_api_key_file": str(key)})


def test_grpc_options_bound_messages_and_keep_connections_alive() -> None:
    options = dict(
        channel_options(Settings(max_message_bytes=1234, keepalive_time=60, max_connection_age=300))
    )
    assert options["grpc.max_receive_message_length"] == 1234
    assert options["grpc.max_send_message_length"] == 1234
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert "grpc.max_connection_age_ms" not in dict(channel_options(Settings(max_connection_age=0)))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RERANK_TLS_CERT": "cert.pem"}, "tls-cert and tls-key go together"),
        ({"RERANK_TLS_CLIENT_CA": "ca.pem"}, "tls-client-ca requires tls-cert"),
        ({"RERANK_METRICS_PORT": "web"}, "metrics-port must be a port number or off"),
        ({"RERANK_UPSTREAM_BREAKER_FAILURES": "-1"}, "upstream-breaker-failures must be 0 or more"),
    ],
)
def test_new_settings_refuse_bad_values_with_the_setting_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({}, env)


def test_metrics_endpoint_is_off_unless_a_port_is_given() -> None:
    assert load_settings({}, {}).metrics_port is None
    assert load_settings({}, {"RERANK_METRICS_PORT": "off"}).metrics_port is None
    assert load_settings({}, {"RERANK_METRICS_PORT": "9100"}).metrics_port == 9100
