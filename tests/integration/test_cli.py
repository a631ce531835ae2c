"""The `rerank-service` command as a person runs it: serve, rerank, models, health, bad settings."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from rerank_service.testing.fake_upstream import FakeUpstream, expected_ranking
from tests.conftest import CALLER_KEY, UPSTREAM_KEY
from tests.support.certs import CertificateAuthority
from tests.support.process import ServiceProcess, run_cli

DOCUMENTS = ["apple pie recipe", "a red apple on a red table", "car engines"]


@pytest.mark.parametrize(
    ("args", "env", "mentions"),
    [
        (["--upstream-dialect", "soap"], {}, "upstream-dialect"),
        (["--port", "70000"], {}, "port"),
        (["--port", "http"], {}, "port"),
        (["--upstream-url", "not a url"], {}, "upstream-url"),
        (["--upstream-url", "ftp://example.com"], {}, "upstream-url"),
        (["--upstream-timeout", "-1"], {}, "upstream-timeout"),
        (["--max-documents", "0"], {}, "max-documents"),
        ([], {"RERANK_BACKEND": "quantum"}, "backend"),
        (
            ["--backend", "upstream"],
            {"RERANK_API_KEYS": "k1,k2", "RERANK_UPSTREAM_API_KEY": "", "DASHSCOPE_API_KEY": ""},
            "upstream",
        ),
        (["--api-keys-file", "/nonexistent/keys.txt"], {}, "api-keys-file"),
    ],
)
def test_a_bad_setting_stops_start_up_with_one_clear_line_and_exit_code_2(
    args: list[str], env: dict[str, str], mentions: str
) -> None:
    result = run_cli("serve", "--port", "0", *args, env=env)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("rerank-service: configuration error:")
    assert mentions in lines[0]


def test_serve_then_rerank_models_and_health_from_the_command_line(upstream: FakeUpstream) -> None:
    with ServiceProcess(
        ["--backend", "upstream", "--upstream-url", upstream.url],
        env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, "RERANK_API_KEYS": CALLER_KEY},
    ) as service:
        key = {"RERANK_API_KEY": CALLER_KEY}
        ranked = run_cli(
            "rerank", "--target", service.target, "--model", "qwen3-rerank", "--query", "red apple",
            *[f"-d{d}" for d in DOCUMENTS], "--top-n", "2", "--return-documents", env=key,
        )  # fmt: skip
        as_json = run_cli(
            "rerank", "--target", service.target, "--query", "red apple", *[f"-d{d}" for d in DOCUMENTS],
            "--json", env=key,
        )  # fmt: skip
        refused = run_cli(
            "rerank", "--target", service.target, "--query", "q", "-d", "x", env={"RERANK_API_KEY": ""}
        )
        models = run_cli("models", "--target", service.target, env=key)
        health = run_cli("health", "--target", service.target)
        exit_code = service.terminate(signal.SIGTERM)

    assert ranked.returncode == 0, ranked.stderr
    best, second = expected_ranking("red apple", DOCUMENTS)[:2]
    lines = ranked.stdout.splitlines()
    assert lines[0].startswith("request_id: ")
    assert lines[1].split() == ["1.", f"[{best[0]}]", f"{best[1]:.4f}", *DOCUMENTS[best[0]].split()]
    assert lines[2].split()[:3] == ["2.", f"[{second[0]}]", f"{second[1]:.4f}"]
    assert len(lines) == 3

    payload = json.loads(as_json.stdout)
    assert [r["index"] for r in payload["output"]["results"]] == [
        i for i, _ in expected_ranking("red apple", DOCUMENTS)
    ]

    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr

    assert models.returncode == 0
    assert "qwen3-rerank" in models.stdout
    assert "max_documents=10000" in models.stdout
    assert f"format=dashscope  upstream={upstream.url}" in models.stdout

    assert health.returncode == 0
    assert health.stdout.strip() == "SERVING"

    # SIGTERM drains and exits 0; keys never reach the log.
    assert exit_code == 0
    events = [event["event"] for event in service.events()]
    assert events[:2] == ["listening", "serving"]
    assert events[-2:] == ["draining", "stopped"]
    calls = [event for event in service.events() if event["event"] == "call"]
    assert [(call["method"].rsplit("/", 1)[1], call["code"]) for call in calls] == [
        ("Rerank", "OK"),
        ("ListModels", "OK"),  # `rerank` without --model asks for the server's first model
        ("Rerank", "OK"),
        ("ListModels", "UNAUTHENTICATED"),
        ("ListModels", "OK"),
    ]
    assert UPSTREAM_KEY not in service.output
    assert CALLER_KEY not in service.output


def test_health_command_fails_when_nothing_serves() -> None:
    result = run_cli("health", "--target", "127.0.0.1:1", "--timeout", "1")

    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


def test_sigint_also_drains_and_exits_zero(upstream: FakeUpstream) -> None:
    with ServiceProcess(["--backend", "upstream", "--upstream-url", upstream.url]) as service:
        assert service.terminate(signal.SIGINT) == 0
    assert service.events()[-1]["event"] == "stopped"


def test_serve_with_an_unknown_key_in_its_config_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("upstream_timeout: 10\nupstrem_url: http://127.0.0.1:9\n", encoding="utf-8")

    result = run_cli("serve", "--port", "0", "--config", str(config))

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"rerank-service: configuration error: config {config}: unknown setting 'upstrem_url' "
        "(did you mean 'upstream_url'?)"
    ]


@pytest.mark.parametrize("text", ["", "# to be written\n"], ids=["empty", "comments-only"])
def test_serve_and_check_config_with_an_empty_config_file_exit_2_naming_it(tmp_path: Path, text: str) -> None:
    """A truncated file must not start the demo model in place of the routes it held."""
    config = tmp_path / "rerank.yaml"
    config.write_text(text, encoding="utf-8")

    _serve_and_check_config_refuse(config, f"config {config}: is empty")


def _serve_and_check_config_refuse(config: Path, problem: str, env: dict[str, str] | None = None) -> None:
    """`serve --config` and `check-config` each exit 2 with one line starting with `problem`;
    serve never starts serving."""
    served = run_cli("serve", "--port", "0", "--metrics-port", "off", "--config", str(config), env=env)
    checked = run_cli("check-config", str(config), env=env)

    for result in (served, checked):
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"rerank-service: configuration error: {problem}")
    assert "listening" not in served.stderr + served.stdout


UPSTREAM_FILE = "backend: upstream\nupstream_url: http://127.0.0.1:9\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            UPSTREAM_FILE + "tls_cert: /nonexistent/server.pem\ntls_key: /nonexistent/server.key\n",
            "tls-cert /nonexistent/server.pem: cannot read it (No such file or directory)",
        ),
        ("workers: 2\nbackend: local\n", "workers 2 with the local backend on device auto: "),
        (
            UPSTREAM_FILE + "usage_log: /nonexistent/dir/usage.jsonl\n",
            "usage-log /nonexistent/dir/usage.jsonl: cannot open it (No such file or directory)",
        ),
        (
            UPSTREAM_FILE + "cache_store: rediss://127.0.0.1:9\ncache_store_ca_file: /nonexistent/ca.pem\n",
            "cache-store-ca-file /nonexistent/ca.pem: No such file or directory",
        ),
        (
            UPSTREAM_FILE + "limits_store: rediss://127.0.0.1:9\nlimits_store_ca_file: /nonexistent/ca.pem\n",
            "limits-store-ca-file /nonexistent/ca.pem: No such file or directory",
        ),
        (
            UPSTREAM_FILE + "cache_store: 'redis://127.0.0.1:9/0?socket_timeout=abc'\n",
            "cache-store must not set socket_timeout in its query, which takes redis-py's TLS options",
        ),
        (
            UPSTREAM_FILE + "limits_store: 'redis://127.0.0.1:9/0?health_check_interval=abc'\n",
            "limits-store has a query redis cannot read (Invalid value for 'health_check_interval'",
        ),
    ],
    ids=[
        "tls-files",
        "workers-on-a-gpu",
        "usage-log",
        "cache-store-ca",
        "limits-store-ca",
        "cache-store-query",
        "limits-store-query",
    ],
)
def test_check_config_refuses_what_serve_refuses_as_it_starts(
    tmp_path: Path, text: str, problem: str
) -> None:
    config = tmp_path / "rerank.yaml"
    config.write_text(text, encoding="utf-8")

    _serve_and_check_config_refuse(config, problem)


@pytest.mark.parametrize("store", ["cache_store", "limits_store"])
def test_check_config_and_serve_refuse_a_store_ca_file_holding_no_certificate(
    tmp_path: Path, store: str
) -> None:
    """Only its readability was checked: a key file given as the CA was taken, and the store
    then never connected."""
    _, key = CertificateAuthority().issue_server().write(tmp_path, "redis")
    config = tmp_path / "rerank.yaml"
    text = f"{store}: rediss://127.0.0.1:9\n{store}_ca_file: {key}\n"
    config.write_text(UPSTREAM_FILE + text, encoding="utf-8")

    problem = f"{store.replace('_', '-')}-ca-file {key}: holds no valid PEM certificate"
    _serve_and_check_config_refuse(config, problem)


def test_serve_and_check_config_refuse_one_port_for_two_servers(tmp_path: Path) -> None:
    """check-config said ok; serve exited 1 ("cannot start": its own gRPC server held the port)."""
    config = tmp_path / "rerank.yaml"
    config.write_text(UPSTREAM_FILE + "port: 50999\nhttp_port: 50999\n", encoding="utf-8")

    served = run_cli("serve", "--config", str(config))  # the file's ports, not --port 0
    checked = run_cli("check-config", str(config))

    for result in (served, checked):
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            "rerank-service: configuration error: port and http-port are both 50999: each port serves "
            "one thing"
        ]


def test_check_config_refuses_an_otlp_protocol_serve_refuses(tmp_path: Path) -> None:
    config = tmp_path / "rerank.yaml"
    config.write_text(UPSTREAM_FILE + "otlp_endpoint: http://127.0.0.1:4317\n", encoding="utf-8")

    _serve_and_check_config_refuse(
        config,
        "OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf, got 'http/json'",
        env={"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
    )


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        (
            "OTEL_EXPORTER_OTLP_COMPRESSION",
            "zstd",
            'the OTLP exporter cannot start: Invalid value "zstd" for compression envvar '
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ),
        (
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            "10s",
            "OTEL_EXPORTER_OTLP_TIMEOUT must be a number of seconds, got '10s'",
        ),
        (
            "OTEL_BSP_MAX_QUEUE_SIZE",
            "lots",
            "OTEL_BSP_MAX_QUEUE_SIZE must be a whole number of 1 or more, got 'lots'",
        ),
    ],
)
def test_check_config_refuses_an_otel_value_serve_refuses_naming_its_variable(
    tmp_path: Path, variable: str, value: str, problem: str
) -> None:
    """check-config said ok; serve exited 2 naming no variable (1, with a traceback, for the
    compression)."""
    config = tmp_path / "rerank.yaml"
    config.write_text(UPSTREAM_FILE + "otlp_endpoint: http://127.0.0.1:4317\n", encoding="utf-8")

    _serve_and_check_config_refuse(config, problem, env={variable: value})


def test_check_config_refuses_tracing_without_opentelemetrys_sdk_as_serve_does(tmp_path: Path) -> None:
    """The SDK is an extra (otel): check-config said ok, and serve then exited 2."""
    shadow = tmp_path / "without-otel" / "opentelemetry"  # a package hiding the installed one
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("", encoding="utf-8")
    config = tmp_path / "rerank.yaml"
    config.write_text(UPSTREAM_FILE + "otlp_endpoint: http://127.0.0.1:4317\n", encoding="utf-8")

    _serve_and_check_config_refuse(
        config,
        "tracing is configured (otlp-endpoint, OTEL_EXPORTER_OTLP_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) but OpenTelemetry's SDK is not installed",
        env={"PYTHONPATH": str(shadow.parent)},
    )


def test_check_config_creates_no_usage_log(tmp_path: Path) -> None:
    config = tmp_path / "rerank.yaml"
    config.write_text(UPSTREAM_FILE + f"usage_log: {tmp_path / 'usage.jsonl'}\n", encoding="utf-8")

    assert run_cli("check-config", str(config)).returncode == 0
    assert not (tmp_path / "usage.jsonl").exists()


def test_check_config_names_a_file_whose_name_is_not_utf8_on_a_strict_utf8_stdout(tmp_path: Path) -> None:
    """A UTF-8 locale's stdout (PYTHONIOENCODING=utf-8 here) refuses the name's byte (a
    surrogate in Python): the last line, after the file had been checked, was a traceback."""
    config = tmp_path / "ok\udcff.yaml"  # b"ok\xff.yaml" on disk
    config.write_text(UPSTREAM_FILE, encoding="utf-8")

    result = run_cli(
        "check-config",
        str(config),
        env={"PYTHONIOENCODING": "utf-8", "RERANK_UPSTREAM_API_KEY": "sk-any-0123456789"},
    )

    assert result.returncode == 0, result.stderr
    # The byte as its escape, as on stderr and in the log.
    assert result.stdout.splitlines()[0] == f"{tmp_path}/ok\\udcff.yaml: ok: 1 routes, 1 deployments"


def test_check_config_warns_of_a_key_file_others_may_read_as_serve_does(tmp_path: Path) -> None:
    """The warning was held for a log check-config never configured, so never shown."""
    key_file = tmp_path / "upstream.key"
    key_file.write_text("sk-readable-0123456789\n", encoding="utf-8")
    key_file.chmod(0o644)
    config = tmp_path / "rerank.yaml"
    config.write_text(
        UPSTREAM_FILE + f"upstream_api_key_file: {key_file}\nlog_format: json\n", encoding="utf-8"
    )

    result = run_cli("check-config", str(config))

    assert result.returncode == 0, result.stderr
    warnings = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(w["event"], w["path"]) for w in warnings] == [("key file readable by others", str(key_file))]
    assert "sk-readable" not in result.stderr


SECRET_IN_URL = "sk-in-a-url-0123456789abcdef"


@pytest.mark.parametrize(
    "url",
    [
        f"http://127.0.0.1:9/v1?api_key={SECRET_IN_URL}",
        f"http://127.0.0.1:9/#{SECRET_IN_URL}",
        f"http://me:{SECRET_IN_URL}@127.0.0.1:9",
    ],
    ids=["query", "fragment", "userinfo"],
)
def test_an_upstream_url_carrying_a_secret_stops_serve_and_check_config_without_showing_it(
    tmp_path: Path, url: str
) -> None:
    config = tmp_path / "rerank.yaml"
    config.write_text(
        f"models:\n  - name: search\n    deployments:\n      - format: cohere\n        url: '{url}'\n",
        encoding="utf-8",
    )

    results = {
        "upstream-url": run_cli("serve", "--port", "0", "--backend", "upstream", "--upstream-url", url),
        "models[0].deployments[0].url": run_cli("check-config", str(config)),
        "models[0].deployments[0].url ": run_cli("serve", "--port", "0", "--config", str(config)),
    }

    for place, result in results.items():
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"rerank-service: configuration error: {place.strip()} must have no "), line
        assert SECRET_IN_URL not in result.stderr + result.stdout


def test_serve_with_an_unreadable_upstream_ca_file_exits_2_before_listening(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"

    result = run_cli(
        "serve", "--port", "0", "--backend", "upstream", "--upstream-url", "https://127.0.0.1:9",
        "--upstream-ca-file", str(missing),
    )  # fmt: skip

    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("rerank-service: configuration error: upstream-ca-file")
    assert str(missing) in line
    assert "listening" not in result.stderr


def test_a_key_from_a_file_is_sent_and_a_key_flag_is_warned_about(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"{CALLER_KEY}\n", encoding="utf-8")
    with ServiceProcess(
        ["--backend", "upstream", "--upstream-url", upstream.url],
        env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, "RERANK_API_KEYS": CALLER_KEY},
    ) as service:
        from_file = run_cli("models", "--target", service.target, "--api-key-file", str(key_file))
        from_flag = run_cli("models", "--target", service.target, "--api-key", CALLER_KEY)

    assert from_file.returncode == 0, from_file.stderr
    assert "warning" not in from_file.stderr
    assert from_flag.returncode == 0
    assert "--api-key shows the key in `ps`" in from_flag.stderr


def test_a_key_from_the_environment_or_the_flag_is_sent_without_surrounding_whitespace(
    upstream: FakeUpstream,
) -> None:
    """As a key file's is: an env file or secret written with `echo` ends the key with a newline."""
    with ServiceProcess(
        ["--backend", "upstream", "--upstream-url", upstream.url],
        env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, "RERANK_API_KEYS": CALLER_KEY},
    ) as service:
        env_newline = run_cli("models", "--target", service.target, env={"RERANK_API_KEY": f"{CALLER_KEY}\n"})
        env_spaces = run_cli("models", "--target", service.target, env={"RERANK_API_KEY": f" {CALLER_KEY} "})
        flag_spaces = run_cli(
            "models", "--target", service.target, "--api-key", f" {CALLER_KEY}\n", env={"RERANK_API_KEY": ""}
        )
        blank = run_cli("models", "--target", service.target, env={"RERANK_API_KEY": " \n"})

    assert env_newline.returncode == 0, env_newline.stderr
    assert env_spaces.returncode == 0, env_spaces.stderr
    assert flag_spaces.returncode == 0, flag_spaces.stderr
    # Blank is no key: the server refuses the call, rather than the CLI a key it cannot send.
    assert blank.returncode == 1, blank.stderr
    assert "UNAUTHENTICATED" in blank.stderr
