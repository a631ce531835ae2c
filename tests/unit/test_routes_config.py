"""The `models:` section: routes of deployments, their keys, overrides, one-line errors, check-config."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from rerank.v1 import rerank_pb2

from rerank_service.cli import main
from rerank_service.config import ConfigError, Settings
from rerank_service.config.deployments import deployment_specs, reload_refusal
from rerank_service.config.local import LocalDeploymentConfig
from rerank_service.config.routes import MIN_CHUNK_TOKENS
from rerank_service.config.settings import options
from rerank_service.config.sources import load_settings
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.routing.build import build_routes

EU_KEY = "sk-eu-0123456789abcdef"
CN_KEY = "sk-cn-fedcba9876543210"
VOYAGE_KEY = "pa-voyage-0123456789"
GLOBAL_KEY = "sk-global-5555555555"
INLINE_KEY = "sk-inline-0a1b2c3d4e5f"

FULL = """\
upstream_timeout: 12
upstream_max_attempts: 4
retry_budget: 0.3
models:
  - name: qwen3-rerank
    deployments:
      - format: dashscope
        url: https://dashscope-intl.aliyuncs.com
        api_key_env: EU_KEY
        weight: 3
        timeout: 7.5
        max_attempts: 2
      - format: compatible
        url: https://dashscope.aliyuncs.com/compatible-api
        name: dashscope-cn
        api_key_file: {key_file}
      - format: cohere
        url: http://vllm.internal:8000
        model: Qwen/Qwen3-Reranker-0.6B
        prompt_template: qwen3
        score_transform: sigmoid
        priority: 1
      - format: local
        source: bundled
        priority: 2
  - name: bge-reranker
    deployments:
      - format: tei
        url: http://tei.internal:8080/
        documents_per_call: 16
      - format: VOYAGE
        url: https://api.voyageai.com
        model: rerank-2
        api_key_env: VOYAGE_KEY
        path: /v1/rerank
        priority: 1
        weight: 2
"""


def write(tmp_path: Path, text: str, name: str = "rerank.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def full_file(tmp_path: Path) -> str:
    key_file = tmp_path / "cn.key"
    key_file.write_text(f"{CN_KEY}\n", encoding="utf-8")
    return write(tmp_path, FULL.format(key_file=key_file))


def load(path: str, **env: str) -> Settings:
    return load_settings({"config": path}, env)


def refusal(path: str, **env: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load(path, **env)
    message = str(raised.value)
    assert "\n" not in message, "a configuration error is one line"
    return message


def routes(*deployments: str, name: str = "qwen3-rerank") -> str:
    """A models section of one route whose deployments are the given YAML mappings."""
    items = "".join(
        "      - " + textwrap.indent(textwrap.dedent(item).strip(), "        ")[8:] + "\n"
        for item in deployments
    )
    return f"models:\n  - name: {name}\n    deployments:\n{items}"


# --- a full section loads ------------------------------------------------------------------------


def test_a_full_models_section_loads_with_every_format_priority_weight_and_override(tmp_path: Path) -> None:
    settings = load(full_file(tmp_path), EU_KEY=EU_KEY, VOYAGE_KEY=VOYAGE_KEY)

    qwen, bge = settings.models
    assert (qwen.name, bge.name) == ("qwen3-rerank", "bge-reranker")
    assert [(d.format, d.priority, d.weight) for d in qwen.deployments] == [
        ("dashscope", 0, 3),
        ("compatible", 0, 1),
        ("cohere", 1, 1),
        ("local", 2, 1),
    ]
    assert [(d.format, d.priority, d.weight) for d in bge.deployments] == [("tei", 0, 1), ("voyage", 1, 2)]
    assert qwen.deployments[0].timeout == 7.5
    assert [d.label() for d in qwen.deployments + bge.deployments] == [
        "dashscope-intl.aliyuncs.com",
        "dashscope-cn",
        "vllm.internal:8000",
        "local:bundled",
        "tei.internal:8080",
        "api.voyageai.com",
    ]


def test_keys_are_read_from_their_variable_or_file_and_listed_among_the_secrets(tmp_path: Path) -> None:
    settings = load(
        full_file(tmp_path), EU_KEY=f" {EU_KEY} ", VOYAGE_KEY=VOYAGE_KEY, RERANK_UPSTREAM_API_KEY=GLOBAL_KEY
    )

    keys = [d.api_key.reveal() if d.api_key else None for r in settings.models for d in r.deployments]
    assert keys == [EU_KEY, CN_KEY, None, None, None, VOYAGE_KEY]
    assert sorted(secret.reveal() for secret in settings.secrets()) == sorted(
        [GLOBAL_KEY, EU_KEY, CN_KEY, VOYAGE_KEY]
    )
    for rendered in (str(settings), repr(settings)):
        for key in (EU_KEY, CN_KEY, VOYAGE_KEY, GLOBAL_KEY):
            assert key not in rendered


def test_each_deployment_gets_its_own_settings_with_overrides_and_the_global_ones_otherwise(
    tmp_path: Path,
) -> None:
    settings = load(
        full_file(tmp_path), EU_KEY=EU_KEY, VOYAGE_KEY=VOYAGE_KEY, RERANK_UPSTREAM_API_KEY=GLOBAL_KEY
    )

    specs = {spec.name: spec for spec in deployment_specs(settings)}

    assert [(spec.route, spec.name, spec.priority, spec.weight) for spec in specs.values()] == [
        ("qwen3-rerank", "dashscope-intl.aliyuncs.com", 0, 3),
        ("qwen3-rerank", "dashscope-cn", 0, 1),
        ("qwen3-rerank", "vllm.internal:8000", 1, 1),
        ("qwen3-rerank", "local:bundled", 2, 1),
        ("bge-reranker", "tei.internal:8080", 0, 1),
        ("bge-reranker", "api.voyageai.com", 1, 2),
    ]
    eu = specs["dashscope-intl.aliyuncs.com"].config
    assert isinstance(eu, UpstreamDeploymentConfig)
    assert (eu.connection.url, eu.format) == ("https://dashscope-intl.aliyuncs.com", "dashscope")
    assert (eu.connection.timeout, eu.retry.max_attempts) == (7.5, 2)  # its overrides
    assert eu.models == ("qwen3-rerank",)  # the route's name when it names no model
    assert eu.api_key is not None
    assert eu.api_key.reveal() == EU_KEY

    vllm = specs["vllm.internal:8000"].config
    assert isinstance(vllm, UpstreamDeploymentConfig)
    assert (vllm.connection.timeout, vllm.retry.max_attempts) == (12.0, 4)  # the file's globals
    assert vllm.models == ("Qwen/Qwen3-Reranker-0.6B",)
    assert (vllm.prompt_template, vllm.score_transform) == ("qwen3", "sigmoid")
    assert vllm.api_key is not None
    assert vllm.api_key.reveal() == GLOBAL_KEY

    tei = specs["tei.internal:8080"].config
    assert isinstance(tei, UpstreamDeploymentConfig)
    assert (tei.connection.url, tei.format, tei.documents_per_call) == ("http://tei.internal:8080", "tei", 16)
    assert tei.prompt_template == Settings().upstream_prompt_template  # the default
    voyage = specs["api.voyageai.com"].config
    assert isinstance(voyage, UpstreamDeploymentConfig)
    assert (voyage.format, voyage.path, voyage.models) == ("voyage", "/v1/rerank", ("rerank-2",))

    local = specs["local:bundled"].config
    assert isinstance(local, LocalDeploymentConfig)
    assert local.models == (("qwen3-rerank", "bundled"),)
    # A deployment's config holds its own fields only: no route, no front-door setting.
    for spec in specs.values():
        fields = {field.name for field in dataclasses.fields(spec.config)}
        assert not fields & {
            "retry_budget",
            "host",
            "port",
            "http_port",
            "api_keys",
            "chunk_concurrency",
            "workers",
        }


def test_a_local_deployment_chooses_its_own_engine(tmp_path: Path) -> None:
    text = routes(
        "format: local\nsource: bundled\nname: fast\nengine: onnx\nquantize: int8",
        "format: local\nsource: bundled\nname: plain",
    )
    specs = {spec.name: spec.config for spec in deployment_specs(load(write(tmp_path, text)))}
    fast, plain = specs["fast"], specs["plain"]

    assert isinstance(fast, LocalDeploymentConfig)
    assert isinstance(plain, LocalDeploymentConfig)
    assert (fast.engine.engine, fast.engine.quantize) == ("onnx", "int8")
    assert (plain.engine.engine, plain.engine.quantize) == ("torch", "none")  # the global


def test_without_a_models_section_there_are_no_routes_and_no_deployment_specs(tmp_path: Path) -> None:
    settings = load(write(tmp_path, "upstream_timeout: 3\n"))

    assert settings.models == ()
    assert deployment_specs(settings) == []


# --- one-line errors that name their place ------------------------------------------------------------

GOOD = "format: cohere\nurl: http://a.example"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            routes(f"{GOOD}\nregion: eu"),
            "models[0].deployments[0].region is not a known setting",
        ),
        (
            "models:\n  - name: x\n    weight: 2\n    deployments:\n      - {format: tei, url: http://a.example}\n",
            "models[0].weight is not a known setting",
        ),
        (routes("format: cohere"), "models[0].deployments[0] format cohere needs url"),
        (
            routes(GOOD, "format: grpc\nurl: http://b.example"),
            "models[0].deployments[1].format must be 'dashscope', 'compatible', 'cohere', 'tei', 'voyage' "
            "or 'local', got 'grpc'",
        ),
        (
            routes(GOOD, "format: tei\nurl: ftp://b.example"),
            "models[0].deployments[1].url must be an http(s) URL such as "
            "https://dashscope-intl.aliyuncs.com, got 'ftp://b.example'",
        ),
        (
            routes(f"{GOOD}\ntimeout: -1"),
            "models[0].deployments[0].timeout must be a finite number of seconds > 0, at most 31,536,000 "
            "(a year), got -1",
        ),
        (
            routes(f"{GOOD}\nbreaker_window: 1e12"),
            "models[0].deployments[0].breaker_window must be a finite number of seconds > 0, at most 3600, "
            "got 1000000000000.0",
        ),
        (
            routes(f"{GOOD}\nweight: 2147483648"),
            "models[0].deployments[0].weight must be less than or equal to 2147483647, got 2147483648",
        ),
        (
            routes(f"{GOOD}\npriority: 2147483648"),
            "models[0].deployments[0].priority must be less than or equal to 2147483647, got 2147483648",
        ),
        (
            routes("format: local\nsource: ' '"),
            "models[0].deployments[0].source must name the model: a directory, a hub id or 'bundled'",
        ),
        (
            routes(f"{GOOD}\napi_key_file: ''"),
            "models[0].deployments[0].api_key_file must not be blank: leave the key out instead",
        ),
        (
            routes(GOOD).replace("    deployments:", "    max_tokens_per_doc: yes\n    deployments:"),
            "models[0].max_tokens_per_doc must be a number, not a switch",
        ),
        (
            routes(f"{GOOD}\nmax_connections: 0"),
            "models[0].deployments[0].max_connections must be an integer from 1 to 2147483647, got 0",
        ),
        (
            routes(f"{GOOD}\nweight: 0"),
            "models[0].deployments[0].weight must be greater than or equal to 1, got 0",
        ),
        (
            routes("format: local\nsource: bundled\nurl: http://a.example"),
            "models[0].deployments[0] format local takes no url",
        ),
        (
            routes("format: local\nsource: bundled\ntimeout: 3"),
            "models[0].deployments[0] format local takes no timeout",
        ),
        (
            # Set to 0 or blank is set all the same: a local deployment takes none of them.
            routes("format: local\nsource: bundled\nbreaker_failures: 0\nretry_backoff: 0\npath: ''"),
            "models[0].deployments[0] format local takes no path, retry_backoff, breaker_failures",
        ),
        (
            routes("format: local"),
            "models[0].deployments[0] format local needs source (a model directory, a hub id or 'bundled')",
        ),
        (
            routes(f"{GOOD}\nsource: bundled"),
            "models[0].deployments[0] source is for format local only",
        ),
        (
            routes(f"{GOOD}\nengine: onnx\nquantize: int8"),
            "models[0].deployments[0] engine and quantize are for format local only",
        ),
        (
            routes("format: local\nsource: bundled\nengine: tensorrt"),
            "models[0].deployments[0].engine must be 'torch' or 'onnx', got 'tensorrt'",
        ),
        (
            routes("format: local\nsource: bundled\nquantize: int8"),
            "models[0].deployments[0]: local-quantize int8 needs local-engine onnx",
        ),
        (
            routes(f"{GOOD}\napi_key_env: A_KEY\napi_key_file: /a.key"),
            "models[0].deployments[0] api_key_env and api_key_file are exclusive: name one",
        ),
        (
            routes(GOOD, "format: tei\nurl: http://a.example/"),
            "models[0] two deployments are named 'a.example': give each its own name",
        ),
        (
            routes(f"{GOOD}\nname: same", "format: tei\nurl: http://b.example\nname: same"),
            "models[0] two deployments are named 'same': give each its own name",
        ),
        (
            routes(GOOD) + routes("format: tei\nurl: http://b.example").removeprefix("models:\n"),
            "models names two routes 'qwen3-rerank' (models[0] and models[1])",
        ),
        ("models:\n  - name: empty\n    deployments: []\n", "models[0] has no deployments"),
        (
            routes(f"{GOOD}\nname: zürich-1"),
            "models[0].deployments[0].name must be printable ASCII without spaces or commas: "
            "it is sent in the x-deployment header",
        ),
        (
            routes(f"{GOOD}\nname: eu\u20131"),  # an en dash
            "models[0].deployments[0].name must be printable ASCII",
        ),
        (
            routes(GOOD).replace(
                "    deployments:", "    long_documents: chunk\n    max_tokens_per_doc: 4\n    deployments:"
            ),
            f"models[0].max_tokens_per_doc must be at least {MIN_CHUNK_TOKENS} with long_documents chunk",
        ),
    ],
)
def test_a_bad_models_section_is_refused_on_one_line_naming_the_place(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)

    message = refusal(path)

    assert message.startswith(expected)
    assert message.endswith(f"(from models in {path})")


def test_the_largest_priority_and_weight_fit_the_int32_listmodels_sends(tmp_path: Path) -> None:
    """Past 2**31-1 they were taken, then ListModels answered INTERNAL "Value out of range"."""
    largest = 2**31 - 1
    text = routes(f"{GOOD}\npriority: {largest}\nweight: {largest}")

    [spec] = deployment_specs(load(write(tmp_path, text)))

    info = rerank_pb2.DeploymentInfo(priority=spec.priority, weight=spec.weight)
    assert (info.priority, info.weight) == (largest, largest)


def test_a_blank_ca_file_of_a_deployment_is_unset_as_a_blank_upstream_ca_file_is(tmp_path: Path) -> None:
    """It was the directory "." ("ca_file .: Is a directory" from check-config and serve)."""
    text = "upstream_ca_file: /etc/global-ca.pem\n" + routes(f"{GOOD}\nca_file: ''")

    settings = load(write(tmp_path, text))
    [spec] = deployment_specs(settings)

    assert settings.models[0].deployments[0].ca_file is None
    assert isinstance(spec.config, UpstreamDeploymentConfig)
    assert spec.config.connection.ca_file == Path("/etc/global-ca.pem")  # the global one applies


@pytest.mark.parametrize(
    ("mode", "tokens"), [("chunk", MIN_CHUNK_TOKENS), ("truncate", 4), ("reject", 1), ("chunk", None)]
)
def test_a_route_window_too_small_to_chunk_is_taken_where_the_route_does_not_chunk_by_default(
    tmp_path: Path, mode: str, tokens: int | None
) -> None:
    window = "" if tokens is None else f"    max_tokens_per_doc: {tokens}\n"
    text = routes(GOOD).replace("    deployments:", f"    long_documents: {mode}\n{window}    deployments:")

    [route] = load(write(tmp_path, text)).models

    assert (route.long_documents, route.max_tokens_per_doc) == (mode, tokens)


def test_a_key_written_inline_is_refused_without_repeating_it(tmp_path: Path) -> None:
    path = write(tmp_path, routes(GOOD, f"format: tei\nurl: http://b.example\napi_key: {INLINE_KEY}"))

    message = refusal(path)

    assert message.startswith("models[0].deployments[1] a key is never written in the file")
    assert INLINE_KEY not in message


def test_a_key_pasted_where_a_variable_is_named_is_refused_without_repeating_it(tmp_path: Path) -> None:
    """api_key_env: the key itself instead of its variable's name, an easy slip."""
    path = write(tmp_path, routes(f"{GOOD}\napi_key_env: {INLINE_KEY}"))

    message = refusal(path)

    assert message.startswith("models[0].deployments[0].api_key_env")
    assert INLINE_KEY not in message


def test_a_key_variable_that_is_not_set_or_blank_is_refused_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, routes(GOOD, "format: tei\nurl: http://b.example\napi_key_env: TEI_KEY"))

    for env in ({}, {"TEI_KEY": "  "}):
        message = refusal(path, **env)

        assert message == (
            f"models[0].deployments[1].api_key_env names TEI_KEY, which is not set (from models in {path})"
        )


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda directory: directory / "missing.key", "No such file or directory"),
        (lambda directory: directory, "Is a directory"),
    ],
)
def test_an_unreadable_key_file_is_refused_naming_it(
    tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    key_file = make(tmp_path)
    path = write(tmp_path, routes(GOOD, f"format: tei\nurl: http://b.example\napi_key_file: {key_file}"))

    message = refusal(path)

    assert message == f"models[0].deployments[1].api_key_file {key_file}: {problem} (from models in {path})"


def test_an_empty_key_file_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "empty.key"
    key_file.write_text("\n  \n", encoding="utf-8")
    path = write(tmp_path, routes(f"{GOOD}\napi_key_file: {key_file}"))

    assert refusal(path) == (
        f"models[0].deployments[0].api_key_file {key_file} holds no key (from models in {path})"
    )


def test_a_key_file_holding_more_than_the_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    """A `# comment` line, as caller key files allow: every call failed INTERNAL."""
    key_file = tmp_path / "tei.key"
    key_file.write_text("# rotated monthly\nsk-SECRETKEY-XYZ\n", encoding="utf-8")
    path = write(tmp_path, routes(f"{GOOD}\napi_key_file: {key_file}"))

    message = refusal(path)

    assert message == (
        f"models[0].deployments[0].api_key_file {key_file}: the key holds more than one line: write "
        f"the key alone, with no comment (from models in {path})"
    )


def test_a_key_variable_holding_a_space_is_refused_naming_it_not_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, routes(GOOD, "format: tei\nurl: http://b.example\napi_key_env: TEI_KEY"))

    message = refusal(path, TEI_KEY="sk-SECRETKEY-XYZ # rotated")

    assert message == (
        "models[0].deployments[1].api_key_env names TEI_KEY, whose key holds a space: write the key "
        f"alone, with no comment (from models in {path})"
    )


def test_a_key_file_written_with_a_byte_order_mark_is_read_without_it(tmp_path: Path) -> None:
    key_file = tmp_path / "tei.key"
    key_file.write_text("\ufeffsk-key-0123456789\n", encoding="utf-8")
    settings = load(write(tmp_path, routes(f"{GOOD}\napi_key_file: {key_file}")))

    key = settings.models[0].deployments[0].api_key
    assert key is not None
    assert key.reveal() == "sk-key-0123456789"


def test_caller_keys_need_a_key_for_every_upstream_deployment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        routes(
            f"{GOOD}\napi_key_env: A_KEY",
            "format: local\nsource: bundled",  # a local model needs no key
            "format: tei\nurl: http://b.example",
        ),
    )

    message = refusal(path, RERANK_API_KEYS="caller-key", A_KEY=EU_KEY)

    assert message.startswith("models[0].deployments[2] has no key while RERANK_API_KEYS is set")
    assert EU_KEY not in message


def test_caller_keys_are_fine_once_every_upstream_deployment_has_a_key(tmp_path: Path) -> None:
    path = write(tmp_path, routes(f"{GOOD}\napi_key_env: A_KEY", "format: local\nsource: bundled"))
    with_global = write(tmp_path, routes(GOOD), "global.yaml")

    assert load(path, RERANK_API_KEYS="caller-key", A_KEY=EU_KEY).models
    assert load(with_global, RERANK_API_KEYS="caller-key", RERANK_UPSTREAM_API_KEY=GLOBAL_KEY).models


# --- check-config -------------------------------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """check-config reads the process's environment: none of the service's variables are set."""
    for name in list(os.environ):
        if name.startswith("RERANK_") or name == "DASHSCOPE_API_KEY":
            monkeypatch.delenv(name)
    return monkeypatch


def test_check_config_accepts_a_good_file_and_prints_its_routes(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_environment.setenv("EU_KEY", EU_KEY)
    path = write(
        tmp_path,
        routes(
            "format: dashscope\nurl: https://dashscope-intl.aliyuncs.com\napi_key_env: EU_KEY\nweight: 3",
            "format: cohere\nurl: http://vllm.internal:8000\nname: vllm\npriority: 1",
        )
        + routes("format: tei\nurl: http://tei.internal:8080", name="bge").removeprefix("models:\n"),
    )

    assert main(["check-config", path]) == 0

    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{path}: ok: 2 routes, 3 deployments",
        "  qwen3-rerank: dashscope-intl.aliyuncs.com (priority 0, weight 3), vllm (priority 1, weight 1)",
        "  bge: tei.internal:8080 (priority 0, weight 1)",
    ]
    assert EU_KEY not in out + err


def test_check_config_refuses_a_bad_file_with_exit_2_naming_the_place(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, routes(GOOD, "format: cohere\nurl: b.example"))

    assert main(["check-config", path]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(
        "rerank-service: configuration error: models[0].deployments[1].url must be an http(s)"
    )
    assert err.count("\n") == 1


def test_check_config_refuses_a_deployment_whose_key_variable_is_unset(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, routes(f"{GOOD}\napi_key_env: UNSET_KEY_FOR_THIS_TEST"))

    assert main(["check-config", path]) == 2

    assert "models[0].deployments[0].api_key_env names UNSET_KEY_FOR_THIS_TEST" in capsys.readouterr().err


def test_check_config_names_the_deployment_whose_ca_file_cannot_be_read(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file sets no upstream_ca_file: an error naming it would send the reader looking for it."""
    missing = tmp_path / "missing-ca.pem"
    path = write(tmp_path, routes(GOOD, f"format: tei\nurl: https://b.example\nca_file: {missing}"))

    assert main(["check-config", path]) == 2

    err = capsys.readouterr().err
    assert "models[0].deployments[1].ca_file" in err
    assert str(missing) in err


def test_one_url_in_two_routes_is_one_deployment_unless_their_settings_differ(tmp_path: Path) -> None:
    text = (
        "models:\n"
        "  - name: first\n    deployments:\n      - {format: cohere, url: http://vllm.internal:8000}\n"
        "      - {format: tei, url: http://tei.internal:8080}\n"
        "  - name: second\n    deployments:\n      - {format: cohere, url: http://vllm.internal:8000}\n"
        "      - {format: tei, url: http://tei.internal:8080, timeout: 3}\n"
    )
    specs = deployment_specs(load(write(tmp_path, text)))

    assert [spec.name for spec in specs] == [
        "vllm.internal:8000",  # the same settings in both routes: one deployment, shared
        "tei.internal:8080",  # different settings: two deployments, the second named apart
        "vllm.internal:8000",
        "second/tei.internal:8080",
    ]


def test_entries_of_the_same_settings_stay_one_deployment_beside_one_that_differs(tmp_path: Path) -> None:
    """A third route's entry of another timeout split the two routes' shared deployment into
    two renamed ones (two pools, two healths, new metric names)."""
    text = (
        "models:\n"
        "  - name: first\n    deployments:\n      - {format: tei, url: http://tei.internal:8080}\n"
        "  - name: second\n    deployments:\n      - {format: tei, url: http://tei.internal:8080}\n"
        "  - name: third\n    deployments:\n"
        "      - {format: tei, url: http://tei.internal:8080, timeout: 3}\n"
    )
    settings = load(write(tmp_path, text))

    assert [spec.name for spec in deployment_specs(settings)] == [
        "tei.internal:8080",
        "tei.internal:8080",
        "third/tei.internal:8080",
    ]
    first, second, third = (route.members[0].deployment for route in build_routes(settings))
    assert first is second
    assert third is not first


@pytest.mark.parametrize(
    ("third", "expected"),
    [
        (
            "{format: tei, url: http://tei-b.internal:9090, name: second/tei.internal:8080}",
            "models[2].deployments[0].name 'second/tei.internal:8080' is also the name of "
            "models[1].deployments[0], of different settings: give one of them another name",
        ),
        (
            "{format: tei, url: http://second/tei.internal:8080}",  # host `second`, its path
            "models[2].deployments[0] is named 'second/tei.internal:8080', as is "
            "models[1].deployments[0], of different settings: give one of them another name",
        ),
    ],
    ids=["given", "made"],
)
def test_a_name_made_route_slash_host_that_another_entry_is_named_too_is_refused(
    tmp_path: Path, third: str, expected: str
) -> None:
    """Both routes' calls went to the one deployment of the name, built for one of them (its
    URL, its key): one route's calls reached the other's upstream."""
    text = (
        "models:\n"
        "  - name: first\n    deployments:\n      - {format: tei, url: http://tei.internal:8080}\n"
        "  - name: second\n    deployments:\n"
        "      - {format: tei, url: http://tei.internal:8080, timeout: 3}\n"
        f"  - name: third\n    deployments:\n      - {third}\n"
    )

    assert refusal(write(tmp_path, text)).startswith(expected)


def test_an_entry_named_first_that_a_made_name_collides_with_is_the_one_named_in_the_refusal(
    tmp_path: Path,
) -> None:
    text = (
        "models:\n"
        "  - name: zero\n    deployments:\n"
        "      - {format: tei, url: http://tei-b.internal:9090, name: second/tei.internal:8080}\n"
        "  - name: first\n    deployments:\n      - {format: tei, url: http://tei.internal:8080}\n"
        "  - name: second\n    deployments:\n"
        "      - {format: tei, url: http://tei.internal:8080, timeout: 3}\n"
    )

    assert refusal(write(tmp_path, text)).startswith(
        "models[0].deployments[0].name 'second/tei.internal:8080' is also the name of "
        "models[2].deployments[0]"
    )


def test_names_made_from_urls_sources_and_routes_are_percent_encoded_to_fit_x_deployment(
    tmp_path: Path,
) -> None:
    """grpc refuses any byte but printable ASCII in metadata: an answered call became
    INTERNAL "Invalid metadata" for a deployment named after a host or route of other letters."""
    text = (
        "models:\n"
        "  - name: other\n    deployments:\n"
        "      - {format: tei, url: http://tei.internal:8080, timeout: 3}\n"
        "  - name: modèle\n    deployments:\n      - {format: cohere, url: http://bücher.example/v1}\n"
        "      - {format: local, source: /models/mini modèle}\n"
        "      - {format: tei, url: http://tei.internal:8080}\n"
    )
    specs = deployment_specs(load(write(tmp_path, text)))

    assert [spec.name for spec in specs] == [
        "tei.internal:8080",
        "b%C3%BCcher.example/v1",
        "local:mini%20mod%C3%A8le",
        "mod%C3%A8le/tei.internal:8080",
    ]


def test_tokens_pass_through_only_where_an_upstream_deployment_has_no_key(tmp_path: Path) -> None:
    local_only = routes("format: local\nsource: bundled")
    keyless = routes("format: local\nsource: bundled", GOOD)
    keyed = routes("format: local\nsource: bundled", f"{GOOD}\napi_key_env: EU_KEY")

    assert not load(write(tmp_path, local_only)).pass_through
    assert load(write(tmp_path, keyless)).pass_through
    assert not load(write(tmp_path, keyed), EU_KEY=EU_KEY).pass_through


def test_the_flags_deployment_named_after_its_url_is_percent_encoded_too() -> None:
    routes = build_routes(Settings(backend="upstream", upstream_url="http://bücher.example/v1"))

    assert [member.deployment.name for route in routes for member in route.members] == [
        "b%C3%BCcher.example/v1"
    ]


def test_a_name_given_to_deployments_that_differ_is_refused(tmp_path: Path) -> None:
    text = (
        "models:\n"
        "  - name: first\n    deployments:\n      - {format: cohere, url: http://a.internal, name: fleet}\n"
        "  - name: second\n    deployments:\n      - {format: cohere, url: http://b.internal, name: fleet}\n"
    )

    assert refusal(write(tmp_path, text)).startswith(
        "models[0].deployments[0].name 'fleet' names deployments of different settings"
    )


# --- a reload that would change what serves ---------------------------------------------------------

LOCAL = "format: local\nsource: bundled"
OTHER_ROUTE = routes("format: tei\nurl: http://b.example", name="other").removeprefix("models:\n")


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (routes(GOOD), routes(GOOD, "format: tei\nurl: http://b.example") + OTHER_ROUTE),
        (routes(GOOD), "upstream_timeout: 3\n" + routes("format: tei\nurl: http://b.example")),
        (routes(LOCAL), routes(LOCAL, name="minilm")),
        ("upstream_timeout: 3\n", routes(LOCAL)),  # flags alone serve the local demo model too
        ("backend: upstream\n", routes(GOOD)),  # a models section may be added
    ],
    ids=["more-upstreams", "other-upstream", "local-renamed", "local-to-local-routes", "models-added"],
)
def test_a_reload_that_keeps_the_backend_kind_and_the_models_section_is_taken(
    tmp_path: Path, before: str, after: str
) -> None:
    old = load(write(tmp_path, before, "old.yaml"))

    assert reload_refusal(old, load(write(tmp_path, after, "new.yaml"))) is None


@pytest.mark.parametrize(
    ("before", "after", "why"),
    [
        (routes(GOOD), routes(LOCAL), "would change the backends that serve from upstream to local"),
        (
            routes(GOOD),
            routes(GOOD, f"{LOCAL}\npriority: 1"),
            "would change the backends that serve from upstream to upstream and local",
        ),
        (
            routes(GOOD),
            "upstream_timeout: 3\n",
            "has no models: section any more: its routes would give way to the local backend's "
            "all-minilm-l6-v2",
        ),
        (
            routes(GOOD),
            "backend: upstream\n",
            "has no models: section any more: its routes would give way to the upstream backend's "
            "qwen3-rerank",
        ),
        ("backend: upstream\n", "backend: local\n", "from upstream to local"),
    ],
    ids=["upstream-to-local", "local-added", "models-dropped", "models-dropped-for-upstream", "flags"],
)
def test_a_reload_that_changes_the_backend_kind_or_drops_the_models_section_needs_the_file_to_say_so(
    tmp_path: Path, before: str, after: str, why: str
) -> None:
    old = load(write(tmp_path, before, "old.yaml"))
    new = write(tmp_path, after, "new.yaml")

    refused = reload_refusal(old, load(new))

    assert refused is not None
    assert why in refused
    assert refused.endswith(f"set allow_backend_change: true in {new} if that is meant")
    allowed = write(tmp_path, f"allow_backend_change: true\n{after}", "allowed.yaml")
    assert reload_refusal(old, load(allowed)) is None


CALLERS = f"callers:\n  - name: search\n    credentials: [{{key_sha256: {'ab' * 32}}}]\n"


@pytest.mark.parametrize(
    ("before", "after"),
    [("backend: local\n", "backend: local\n" + CALLERS), ("backend: local\n" + CALLERS, "backend: local\n")],
    ids=["callers-added", "callers-emptied"],
)
def test_a_reload_never_switches_callers_authentication_on_or_off_even_when_allowed(
    tmp_path: Path, before: str, after: str
) -> None:
    old = load(write(tmp_path, before, "old.yaml"))

    for text in (after, "allow_backend_change: true\n" + after):
        refused = reload_refusal(old, load(write(tmp_path, text, "new.yaml")))
        assert refused is not None
        assert refused.startswith("a reload cannot switch callers' authentication on or off")


def test_callers_added_beside_api_keys_switch_nothing(tmp_path: Path) -> None:
    env = {"RERANK_API_KEYS": "caller-key-0123456789"}
    old = load(write(tmp_path, "backend: local\n", "old.yaml"), **env)

    assert reload_refusal(old, load(write(tmp_path, "backend: local\n" + CALLERS, "new.yaml"), **env)) is None


def test_allow_backend_change_is_read_from_the_file_only(tmp_path: Path) -> None:
    """A flag or variable would allow every later reload too: only the file being loaded says so."""
    assert load(write(tmp_path, "allow_backend_change: true\n")).allow_backend_change
    unset = write(tmp_path, "upstream_timeout: 3\n", "unset.yaml")
    assert not load(unset, RERANK_ALLOW_BACKEND_CHANGE="true").allow_backend_change
    assert "allow_backend_change" not in {option.name for option in options()}


# --- check-config resolves every local source ----------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("{tmp}/no-such-model", "model directory '{tmp}/no-such-model' does not exist"),
        ("{tmp}/rerank.yaml", "model source '{tmp}/rerank.yaml' is a file; it must be a model directory"),
    ],
    ids=["missing-directory", "a-file"],
)
def test_check_config_refuses_a_local_source_that_does_not_resolve_naming_its_place(
    tmp_path: Path,
    clean_environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str,
    problem: str,
) -> None:
    source, problem = source.format(tmp=tmp_path), problem.format(tmp=tmp_path)
    path = write(tmp_path, routes(GOOD, f"format: local\nsource: {source}\npriority: 1"))

    assert main(["check-config", path]) == 2

    assert capsys.readouterr().err == (
        f"rerank-service: configuration error: models[0].deployments[1].source: {problem} "
        f"(from models in {path})\n"
    )


def test_check_config_refuses_a_local_model_of_the_flags_that_does_not_resolve(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f"local_models:\n  minilm: bundled\n  mine: {tmp_path}/absent\n")

    assert main(["check-config", path]) == 2

    assert capsys.readouterr().err == (
        f"rerank-service: configuration error: local-models.mine: model directory '{tmp_path}/absent' "
        f"does not exist (from local_models in {path})\n"
    )


def test_check_config_resolves_a_missing_directory_without_importing_torch(tmp_path: Path) -> None:
    """The check finds the files only: nothing of torch or transformers is loaded for it."""
    path = write(tmp_path, routes(f"format: local\nsource: {tmp_path}/absent"))
    script = (
        "import sys\n"
        "from rerank_service.cli import main\n"
        f"code = main(['check-config', {path!r}])\n"
        "print(code, sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("RERANK_")}

    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60, check=False
    )

    assert ran.stdout.strip() == "2 []", ran.stderr
    assert "models[0].deployments[0].source" in ran.stderr


def test_check_config_refuses_an_empty_file(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "# models: to come\n")

    assert main(["check-config", path]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"rerank-service: configuration error: config {path}: is empty")


def test_a_deployment_url_with_a_query_is_refused_naming_its_place_without_repeating_it(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, routes(GOOD, f"format: cohere\nurl: https://b.example/v1?key={INLINE_KEY}"))

    assert main(["check-config", path]) == 2

    err = capsys.readouterr().err
    assert err.startswith(
        "rerank-service: configuration error: models[0].deployments[1].url must have no query"
    )
    assert INLINE_KEY not in err


@pytest.mark.parametrize(
    ("before", "after", "now"),
    [
        (routes(GOOD), routes(f"{GOOD}\napi_key_env: EU_KEY"), "off"),
        (routes(f"{GOOD}\napi_key_env: EU_KEY"), routes(GOOD), "on"),
    ],
    ids=["every-deployment-keyed", "a-key-dropped"],
)
def test_a_reload_never_switches_pass_through_on_or_off_even_when_allowed(
    tmp_path: Path, before: str, after: str, now: str
) -> None:
    # Pass-through requires each caller's token (the upstream checks it); keyed deployments
    # with no caller keys take calls without one: switching is switching authentication.
    old = load(write(tmp_path, before, "old.yaml"), EU_KEY=EU_KEY)

    for text in (after, "allow_backend_change: true\n" + after):
        new = load(write(tmp_path, text, "new.yaml"), EU_KEY=EU_KEY)
        assert old.pass_through != new.pass_through
        refused = reload_refusal(old, new)
        assert refused is not None
        assert refused.startswith(f"a reload cannot switch pass-through of callers' bearer tokens {now}")


def test_a_reload_that_keeps_pass_through_is_not_refused_for_it(tmp_path: Path) -> None:
    old = load(write(tmp_path, routes(GOOD), "old.yaml"))
    new = load(write(tmp_path, routes(GOOD, "format: tei\nurl: http://b.example"), "new.yaml"))

    assert old.pass_through
    assert new.pass_through
    assert reload_refusal(old, new) is None
