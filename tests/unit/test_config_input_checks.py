"""Configuration that every check passed and the service then failed on, or that ended in a
traceback: each now one configuration-error line (exit 2), never repeating a password."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rerank_service.config import ConfigError, Settings, load_settings
from rerank_service.config.sources import file_layer
from rerank_service.routing.build import check_local_sources
from tests.support.certs import CertificateAuthority
from tests.support.process import ServiceProcess

PASSWORD = "S3cretPassw0rdXyz"
UPSTREAM = {"RERANK_UPSTREAM_API_KEY": "sk-upstream-0123456789"}


def refusal(args: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as raised:
        load_settings(args, env or {})
    message = str(raised.value)
    assert "\n" not in message, "a configuration error is one line"
    return message


def file_refusal(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = tmp_path / "rerank.yaml"
    path.write_text(text, encoding="utf-8")
    return refusal({"config": str(path)}, env)


# --- a local model's directory: what the loader reads, found before serve -------------------


def _local(source: Path) -> Settings:
    return Settings(backend="local", local_models=(("mine", str(source)),))


def test_a_local_model_directory_without_config_json_fails_the_check(tmp_path: Path) -> None:
    """Any directory passed check-config (and a --workers reload), then serve refused it."""
    with pytest.raises(ConfigError) as raised:
        check_local_sources(_local(tmp_path))

    assert str(raised.value) == (
        f"local-models.mine: model directory {tmp_path} has no config.json, so it is not a transformers model"
    )


def test_a_local_model_directory_without_weights_fails_the_check(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}), encoding="utf-8")

    with pytest.raises(ConfigError, match=r"local-models.mine: model directory .* has no weights"):
        check_local_sources(_local(tmp_path))


def test_a_local_model_directory_with_config_and_weights_passes_the_check(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}), encoding="utf-8")
    (tmp_path / "model.safetensors").write_bytes(b"\0")

    check_local_sources(_local(tmp_path))  # nothing is loaded: the files are only found
    check_local_sources(Settings(backend="local"))  # the bundled model


# --- TLS options in a Redis store's URL -------------------------------------------------------


@pytest.fixture
def client_files(tmp_path: Path) -> tuple[Path, Path]:
    return CertificateAuthority().issue_client().write(tmp_path, "client")


def _store(query: str) -> str:
    return f"rediss://:{PASSWORD}@redis.internal:6379/0?{query}"


@pytest.mark.parametrize("setting", ["limits_store", "cache_store"])
def test_a_store_url_naming_a_missing_client_certificate_is_refused(tmp_path: Path, setting: str) -> None:
    """It passed, then every round trip failed (a closed limits store refused every call)."""
    missing = tmp_path / "client-typo.pem"

    message = refusal({setting: _store(f"ssl_certfile={missing}&ssl_password={PASSWORD}")})

    assert message.startswith(
        f"{setting.replace('_', '-')} has a query whose ssl_certfile {missing} cannot be read"
    )
    assert PASSWORD not in message


def test_a_store_url_naming_a_missing_key_file_is_refused(
    client_files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, _ = client_files
    message = refusal({"limits_store": _store(f"ssl_certfile={cert}&ssl_keyfile={tmp_path}/nokey.pem")})

    assert f"ssl_keyfile {tmp_path}/nokey.pem cannot be read" in message
    assert PASSWORD not in message


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("ssl_cert_reqs=bogus", "ssl_cert_reqs is none of none, optional, required"),
        ("ssl_cert_reqs=Required", "ssl_cert_reqs is none of"),  # redis-py reads lower case only
        ("ssl_ciphers=NOPE", "ssl_ciphers selects no cipher"),
        ("ssl_min_version=5", "ssl_min_version is no TLS version"),
        ("ssl_ca_path=/no/such/directory", "ssl_ca_path /no/such/directory is no directory"),
        ("ssl_keyfile=/etc/hostname", "ssl_keyfile has no ssl_certfile"),
    ],
)
def test_store_url_tls_options_every_connection_would_fail_on_are_refused(query: str, words: str) -> None:
    message = refusal({"cache_store": _store(query)})

    assert words in message
    assert PASSWORD not in message


def test_a_client_certificate_file_holding_no_certificate_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n", encoding="utf-8")

    message = refusal({"limits_store": _store(f"ssl_certfile={junk}")})

    assert "hold no PEM client certificate and its key" in message


def test_store_url_tls_options_that_work_are_taken(client_files: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = client_files
    query = (
        f"ssl_certfile={cert}&ssl_keyfile={key}&ssl_cert_reqs=required&ssl_ca_path={tmp_path}"
        "&ssl_ciphers=ECDHE+AESGCM&ssl_min_version=771"
    )

    assert load_settings({"limits_store": _store(query)}, {}).limits_store == _store(query)


# --- a URL written as a list or a mapping: its password never repeated -----------------------


@pytest.mark.parametrize(
    ("setting", "written", "kind"),
    [
        ("cache_store", f'["redis://:{PASSWORD}@redis:6379/0"]', "a list"),
        ("limits_store", f'{{url: "redis://:{PASSWORD}@redis:6379/0"}}', "a mapping"),
        ("upstream_proxy", f'["http://user:{PASSWORD}@proxy:3128"]', "a list"),
        ("otlp_endpoint", f'["http://user:{PASSWORD}@collector:4317"]', "a list"),
        ("upstream_url", f'["https://user:{PASSWORD}@api.example.com"]', "a list"),
    ],
)
def test_a_url_setting_of_the_wrong_type_never_repeats_its_password(
    tmp_path: Path, setting: str, written: str, kind: str
) -> None:
    message = file_refusal(tmp_path, f"backend: upstream\n{setting}: {written}\n", UPSTREAM)

    assert PASSWORD not in message
    assert f"{setting.replace('_', '-')} must be " in message
    assert f", got {kind} (from " in message


@pytest.mark.parametrize("key", ["url", "proxy"])
def test_a_deployments_url_of_the_wrong_type_never_repeats_its_password(tmp_path: Path, key: str) -> None:
    url = f"http://user:{PASSWORD}@proxy.internal:3128"
    deployment = {"format": "dashscope", "url": "http://u.example", "api_key_env": "K", key: [url]}
    text = json.dumps({"models": [{"name": "m", "deployments": [deployment]}]})

    message = file_refusal(tmp_path, text, {"K": "sk-deployment-key"})

    assert PASSWORD not in message
    assert f"models[0].deployments[0].{key} must be" in message
    assert "got a list" in message


def test_a_url_setting_given_as_a_number_is_still_repeated(tmp_path: Path) -> None:
    message = file_refusal(tmp_path, "cache_store: 6379\n")

    assert ", got 6379 (from " in message


# --- a caller's models against the flags' models -----------------------------------------------


def _caller(tmp_path: Path, flags: str, models: str) -> str:
    path = tmp_path / "rerank.yaml"
    path.write_text(
        f"{flags}callers:\n  - name: search\n    credentials: [{{key_env: SEARCH_KEY}}]\n"
        f"    models: {models}\n",
        encoding="utf-8",
    )
    return str(path)


def test_a_callers_model_the_upstream_models_do_not_name_is_refused(tmp_path: Path) -> None:
    """Without a models section only a typo the routes did not serve was refused."""
    path = _caller(tmp_path, "backend: upstream\nupstream_models: [qwen3-rerank]\n", "[qwen3-rerenk]")

    message = refusal({"config": path}, {"SEARCH_KEY": "sk-search-123456", **UPSTREAM})

    assert message.startswith(
        "callers[0].models[0] names 'qwen3-rerenk', which upstream-models does not name "
        "(it names qwen3-rerank)"
    )


def test_a_callers_model_the_default_upstream_model_is_taken(tmp_path: Path) -> None:
    path = _caller(tmp_path, "backend: upstream\n", "[qwen3-rerank, '*']")

    settings = load_settings({"config": path}, {"SEARCH_KEY": "sk-search-123456", **UPSTREAM})

    assert settings.callers[0].models == ("qwen3-rerank", "*")


def test_a_callers_model_the_local_models_do_not_serve_is_refused(tmp_path: Path) -> None:
    env = {"SEARCH_KEY": "sk-search-123456"}
    assert load_settings({"config": _caller(tmp_path, "", "[all-minilm-l6-v2]")}, env).callers

    message = refusal({"config": _caller(tmp_path, "", "[all-minilm-l6]")}, env)

    assert "which local-models does not serve (it serves all-minilm-l6-v2)" in message


# --- odd input: one configuration error, not a traceback ----------------------------------------


def test_a_key_that_is_a_list_is_a_yaml_error(tmp_path: Path) -> None:
    message = file_refusal(tmp_path, "port: 0\n? [a, b]\n: c\n")

    assert message.endswith("not valid YAML: found unhashable key at line 2, column 3")


def test_a_file_nested_too_deeply_is_refused(tmp_path: Path) -> None:
    message = file_refusal(tmp_path, "port: " + "[" * 3000 + "]" * 3000 + "\n")

    assert message.endswith("nests lists or mappings too deeply")


def test_a_lone_surrogate_in_the_file_is_refused(tmp_path: Path) -> None:
    message = file_refusal(tmp_path, 'backend: upstream\nupstream_models: ["\\ud800"]\n', UPSTREAM)

    assert message.startswith("upstream-models holds text that is not UTF-8")
    assert message.encode("utf-8")  # printable and loggable


def test_a_lone_surrogate_in_a_nested_key_is_refused(tmp_path: Path) -> None:
    message = file_refusal(tmp_path, 'models:\n  - name: m\n    "\\udcff": 1\n')

    assert message.startswith("models holds text that is not UTF-8")


@pytest.mark.parametrize("variable", ["RERANK_UPSTREAM_MODELS", "RERANK_UPSTREAM_URL"])
def test_a_variable_holding_a_byte_that_is_not_utf8_is_refused(variable: str) -> None:
    """os.environ holds such a byte as a lone surrogate (surrogateescape)."""
    value = b"https://h.example/qwen3\xffrerank".decode("utf-8", "surrogateescape")

    message = refusal({}, {"RERANK_BACKEND": "upstream", variable: value, **UPSTREAM})

    setting = variable.removeprefix("RERANK_").lower().replace("_", "-")
    assert message == (
        f"{setting} holds text that is not UTF-8 (a byte of another encoding, or a lone surrogate "
        f"such as \\ud800) (from {variable})"
    )


def test_a_key_file_named_by_text_that_is_not_utf8_is_refused() -> None:
    path = b"./key\xff".decode("utf-8", "surrogateescape")

    message = refusal({}, {"RERANK_UPSTREAM_API_KEY_FILE": path})

    assert message == "RERANK_UPSTREAM_API_KEY_FILE names a file by text that is not UTF-8"


def test_a_tokenizer_holding_a_nul_byte_is_refused(tmp_path: Path) -> None:
    message = file_refusal(tmp_path, 'backend: upstream\nupstream_tokenizer: "a\\0b"\n', UPSTREAM)

    assert message.startswith("upstream-tokenizer must be a path without NUL bytes")


def test_file_layer_reads_a_key_that_is_a_number_still(tmp_path: Path) -> None:
    """Hashable keys that are no names still reach the unknown-setting check."""
    path = tmp_path / "rerank.yaml"
    path.write_text("1: a\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="unknown setting 1"):
        file_layer(path, ["port"])


# --- a bracketed IPv6 host ------------------------------------------------------------------------


def test_a_bracketed_ipv6_host_is_the_address_alone() -> None:
    assert load_settings({"host": "[::1]"}, {}).host == "::1"
    assert load_settings({"host": " [fe80::1] "}, {}).host == "fe80::1"
    assert refusal({"host": "[::1"}) == "host must be a host name or address, got '[::1' (from --host)"


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_bracketed_ipv6_host_serves_the_http_and_metrics_ports() -> None:
    """They failed to start on [::1] (gRPC alone took the brackets)."""
    args = ["--host", "[::1]", "--http-port", "0", "--metrics-port", "0"]
    with ServiceProcess(args, {"RERANK_BACKEND": "upstream", **UPSTREAM}) as service:
        assert service.terminate() == 0


# --- numbers a backend cannot take ------------------------------------------------------------


def test_local_threads_past_what_torch_takes_is_a_configuration_error() -> None:
    """torch's thread count is a C int: 10**11 failed the local backend's start with
    "Overflow when unpacking long" (exit 1)."""
    assert "local-threads must be an integer from 0 to 4096" in refusal(
        {"backend": "local", "local_threads": 10**11}
    )
    assert load_settings({"backend": "local", "local_threads": 4096}, {}).local_threads == 4096
