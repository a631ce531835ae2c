"""Client commands given what they cannot send (a top_n past int32, bytes that are not text, a
key grpc refuses as a header, a deadline that is no deadline): one line naming the argument
and exit 2, before any call, never a traceback or a misleading status from the server."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.process import ServiceProcess, run_cli
from tests.support.waiting import wait_until

# Nothing listens here: a command that got as far as calling would fail with exit 1.
NOWHERE = ("--target", "127.0.0.1:1")
# What the OS hands Python for an argument whose bytes are not UTF-8 (b"\xff"), and what
# run_cli turns back into those bytes for the child's argv.
NOT_UTF8 = "\udcff"
KEY_ENV = {"RERANK_API_KEY": ""}  # the machine's own key never decides these tests


def _refused(args: tuple[str, ...]) -> str:
    """Run the command; the one line it printed on stderr, once it exited 2."""
    result = run_cli(*args, env=KEY_ENV)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("top_n", ["99999999999", "2147483648", "0", "-1", "three"])
def test_a_top_n_outside_int32_or_below_1_is_a_usage_error(top_n: str) -> None:
    line = _refused(("rerank", *NOWHERE, "--query", "q", "-d", "a", "--top-n", top_n))

    assert line.startswith("rerank-service rerank: error: argument --top-n: must be "), line


def test_the_largest_top_n_is_taken() -> None:
    """2**31-1 passes the check: the command gets as far as calling (nothing listens)."""
    result = run_cli("rerank", *NOWHERE, "--query", "q", "-d", "a", "--top-n", "2147483647", "--timeout", "1")

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (("rerank", *NOWHERE, "--query", NOT_UTF8, "-d", "a"), "--query"),
        (("rerank", *NOWHERE, "--query", "q", "-d", "a", "-d", NOT_UTF8), "--document/-d"),
        (("rerank", *NOWHERE, "--query", "q", "-d", "a", "--model", NOT_UTF8), "--model"),
        (("rerank", *NOWHERE, "--query", "q", "-d", "a", "--instruct", NOT_UTF8), "--instruct"),
        (("models", "--target", f"host{NOT_UTF8}:1"), "--target"),
        (("health", *NOWHERE, "--service", NOT_UTF8), "--service"),
        (("models", *NOWHERE, "--api-key", f"key{NOT_UTF8}"), "--api-key"),
    ],
    ids=["query", "document", "model", "instruct", "target", "service", "api-key"],
)
def test_an_argument_whose_bytes_are_not_utf8_is_a_usage_error_naming_it(
    args: tuple[str, ...], argument: str
) -> None:
    line = _refused(args)

    assert line.startswith(
        f"rerank-service {args[0]}: error: argument {argument}: is not valid UTF-8 text"
    ), line


def test_a_key_file_that_is_not_text_is_refused_naming_the_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"\xff\xfesecret\n")

    line = _refused(("models", *NOWHERE, "--api-key-file", str(key_file)))

    assert line == f"rerank-service: configuration error: api-key-file {key_file}: not UTF-8 text"


def test_a_key_pasted_where_the_key_file_goes_is_not_repeated() -> None:
    """The server's rule for a key file's path (secret.file_named): shown only when it reads
    as a path, as a key pasted in its place must not be printed to a shared terminal or CI log."""
    key = "sk-pasted0123456789"

    line = _refused(("models", *NOWHERE, "--api-key-file", key))

    assert line == (
        "rerank-service: configuration error: "
        "api-key-file (a relative path, not repeated): No such file or directory"
    )


@pytest.mark.parametrize(
    ("how", "source"),
    [("file", "api-key-file {file}"), ("flag", "api-key"), ("env", "RERANK_API_KEY")],
)
@pytest.mark.parametrize("key", ["clé-secrète", "sk-live 0123"], ids=["non-ASCII", "a space within"])
def test_a_key_that_is_not_printable_ascii_is_refused_naming_where_it_came_from(
    tmp_path: Path, how: str, source: str, key: str
) -> None:
    """grpc would refuse it as a header with INTERNAL "Invalid metadata", naming nothing;
    a space within it no server key holds (the four clients refuse it too)."""
    key_file = tmp_path / "key"
    key_file.write_text(f"{key}\n", encoding="utf-8")
    given = {
        "file": (("--api-key-file", str(key_file)), {}),
        "flag": (("--api-key", key), {}),
        "env": ((), {"RERANK_API_KEY": key}),
    }
    args, env = given[how]

    result = run_cli("models", *NOWHERE, *args, env={**KEY_ENV, **env})

    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after --api-key's warning about `ps`
    assert line == (
        f"rerank-service: configuration error: {source.format(file=key_file)}: "
        "the key must be printable ASCII (letters, digits, punctuation; no spaces)"
    )
    assert key not in result.stderr


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-1", "1e10", "86401", "soon"])
def test_a_timeout_that_is_not_a_finite_deadline_up_to_a_day_is_a_usage_error(timeout: str) -> None:
    line = _refused(("health", *NOWHERE, "--timeout", timeout))

    assert line.startswith("rerank-service health: error: argument --timeout: must be "), line


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("serve", "--api-keys", "k1"), "--api-keys"),  # once taken as --api-keys-file k1
        (("serve", "--upstream-time", "3"), "--upstream-time"),
        (("rerank", *NOWHERE, "--query", "q", "-d", "a", "--top", "2"), "--top"),
        (("health", *NOWHERE, "--serv", "x"), "--serv"),
        (("usage", "--metrics", "http://127.0.0.1:1/metrics", "--metr", "x"), "--metr"),
    ],
    ids=["serve-no-such-flag", "serve-prefix", "rerank-prefix", "health-prefix", "usage-prefix"],
)
def test_an_abbreviated_or_mistyped_flag_is_a_usage_error_not_another_flag(
    args: tuple[str, ...], flag: str
) -> None:
    line = _refused(args)

    assert line.startswith(
        f"rerank-service: error: unrecognized arguments: {flag} (values not repeated); "
    ), line


KEY = "sk-live-0123456789abcdef"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ("serve", "--upstream-api-key", KEY),
            "unrecognized arguments: --upstream-api-key (values not repeated)",
        ),
        (("serve", f"--api-keys={KEY}"), "unrecognized arguments: --api-keys (values not repeated)"),
        (
            ("rerank", *NOWHERE, "--api_key", KEY, "--query", "q", "-d", "d"),
            "unrecognized arguments: --api_key (values not repeated)",
        ),
        (("serve", KEY), "unrecognized arguments: (values not repeated)"),
        (
            ("--upstream-api-key", KEY, "serve"),
            "argument COMMAND: invalid choice, not repeated (choose from ",
        ),
        (("health", *NOWHERE, "--verbose"), "unrecognized arguments: --verbose; "),
    ],
    ids=["flag-then-key", "flag=key", "client-flag", "key-alone", "key-as-command", "no-value"],
)
def test_a_key_given_to_a_flag_that_does_not_exist_is_not_repeated(args: tuple[str, ...], named: str) -> None:
    """Keys never appear in an error (CONFIGURATION.md#secrets), nor in the container's log:
    argparse repeated every argument it did not recognise, and the word it took for the
    command. The options are named, without their values."""
    line = _refused(args)

    assert line.startswith(f"rerank-service: error: {named}"), line
    assert "0123456789abcdef" not in line


def test_a_reload_refused_is_logged_when_the_config_path_is_not_utf8(tmp_path: Path) -> None:
    """serve --config c<0xff>.yaml: after a bad edit and SIGHUP, the "reload refused" line
    (naming the path) was lost, the log's JSON refusing the path's surrogate, and asyncio
    logged "Task exception was never retrieved" in its place."""
    path = tmp_path / f"c{NOT_UTF8}.yaml"
    path.write_text("backend: upstream\nupstream_url: http://127.0.0.1:9\n", encoding="utf-8")
    with ServiceProcess(["--config", str(path)], {"RERANK_UPSTREAM_API_KEY": "sk-any-0123456789"}) as service:

        def refused() -> list[dict[str, Any]]:
            return [event for event in service.events() if event.get("event") == "reload refused"]

        path.write_text("backend: upstream\nbogus: 1\n", encoding="utf-8")
        assert service.process is not None
        service.process.send_signal(signal.SIGHUP)
        # Either line ends the wait: the one logged, or asyncio's in its place.
        assert wait_until(lambda: bool(refused()) or "Task exception" in service.output, timeout=60), (
            service.output
        )
        assert refused(), service.output
        assert service.terminate() == 0

    [line] = refused()
    assert "c\\udcff.yaml" in line["error"], line  # the path's byte shown, not the line lost
    assert "Task exception" not in service.output
