"""A key file others may read, or reached through a symlink, is used with one warning line
that names the file and never its content; a private file, or a Kubernetes secret
volume's links, say nothing."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, TextIO, cast

import pytest
import structlog

from rerank_service.config import load_settings
from rerank_service.config.file_trust import flush_held_warnings
from rerank_service.config.secret import read_key_file
from rerank_service.observability.logging import configure_logging
from tests.support.logs import LogCapture
from tests.support.process import ServiceProcess

KEY = "sk-key-file-content-0123456789"


def key_file(path: Path, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{KEY}\n")
    path.chmod(mode)
    return path


def warnings_about(logs: LogCapture) -> list[dict[str, Any]]:
    return [event for event in logs.events() if event.get("level") == "warning"]


def test_a_key_file_others_may_read_is_warned_about_once_by_name(tmp_path: Path, logs: LogCapture) -> None:
    path = key_file(tmp_path / "keys", 0o644)

    assert read_key_file(path).strip() == KEY

    [warning] = warnings_about(logs)
    assert warning["event"] == "key file readable by others"
    assert warning["path"] == str(path)
    assert warning["mode"] == "0o644"
    assert warning["fix"] == f"chmod 600 {path}"
    assert KEY not in logs.text


def test_a_key_file_behind_a_symlink_is_warned_about_once_by_name(tmp_path: Path, logs: LogCapture) -> None:
    real = key_file(tmp_path / "elsewhere" / "keys")
    link = tmp_path / "config" / "keys"
    link.parent.mkdir()
    link.symlink_to(real)

    assert read_key_file(link).strip() == KEY

    [warning] = warnings_about(logs)
    assert warning["event"] == "key file behind a symlink"
    assert warning["path"] == str(link)
    assert warning["target"] == str(real)
    assert KEY not in logs.text


def test_a_readable_key_behind_a_symlink_is_still_one_line(tmp_path: Path, logs: LogCapture) -> None:
    link = tmp_path / "config" / "keys"
    link.parent.mkdir()
    link.symlink_to(key_file(tmp_path / "elsewhere" / "keys", 0o640))

    read_key_file(link)

    [warning] = warnings_about(logs)
    assert warning["event"] == "key file readable by others"
    assert warning["mode"] == "0o640"
    assert "target" in warning


def test_a_private_key_file_and_a_kubernetes_secret_volume_say_nothing(
    tmp_path: Path, logs: LogCapture
) -> None:
    plain = key_file(tmp_path / "plain" / "keys")
    # The layout the kubelet writes: key -> ..data/key, ..data -> ..<timestamp>/.
    volume = tmp_path / "volume"
    key_file(volume / "..2024_01_01_00_00_00.000" / "keys", 0o400)
    (volume / "..data").symlink_to("..2024_01_01_00_00_00.000")
    (volume / "keys").symlink_to("..data/keys")

    read_key_file(plain)
    read_key_file(volume / "keys")

    assert warnings_about(logs) == []


def test_a_key_file_read_through_its_group_says_nothing_and_one_others_may_read_does(
    tmp_path: Path, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kubernetes secret volume with an fsGroup: root's file, 0440 to the pod's group, which
    the process reads through (it is not the owner). 0400 would lock it out, so there is
    nothing to fix; the same file readable by others is still warned about."""
    group_read = key_file(tmp_path / "group" / "keys", 0o440)
    everyone = key_file(tmp_path / "everyone" / "keys", 0o444)
    owner = group_read.stat().st_uid
    # Files are this process's own: it pretends to be another user of their group.
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)

    read_key_file(group_read)
    assert warnings_about(logs) == []

    read_key_file(everyone)
    assert [event["path"] for event in warnings_about(logs)] == [str(everyone)]


def test_a_key_file_of_its_own_readable_by_its_group_is_warned_about(
    tmp_path: Path, logs: LogCapture
) -> None:
    read_key_file(key_file(tmp_path / "keys", 0o440))

    assert [event["event"] for event in warnings_about(logs)] == ["key file readable by others"]


def test_api_and_upstream_key_files_are_checked_when_the_settings_load(
    tmp_path: Path, logs: LogCapture
) -> None:
    api_keys = key_file(tmp_path / "api-keys", 0o644)
    upstream_key = key_file(tmp_path / "upstream-key", 0o604)

    load_settings({"api_keys_file": str(api_keys), "upstream_api_key_file": str(upstream_key)})

    assert sorted(w["path"] for w in warnings_about(logs)) == [str(api_keys), str(upstream_key)]


def test_a_warning_found_before_logging_is_configured_is_written_once_it_is(tmp_path: Path) -> None:
    path = key_file(tmp_path / "keys", 0o644)
    structlog.reset_defaults()  # as at start: the settings load before logging is set up
    capture, stdout = LogCapture(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):  # where structlog's defaults would print it
            read_key_file(path)
        configure_logging("json", "info", stream=cast(TextIO, capture))
        flush_held_warnings()  # as serve does once logging is set up
    finally:
        configure_logging("json", "warning")

    assert stdout.getvalue() == ""
    [warning] = [event for event in capture.events() if event.get("path") == str(path)]
    assert warning["event"] == "key file readable by others"


def test_serve_writes_the_warning_as_a_json_line(tmp_path: Path) -> None:
    api_keys = key_file(tmp_path / "api-keys", 0o644)

    args = ["--backend", "upstream", "--api-keys-file", str(api_keys)]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": "sk-upstream-0123456789"}) as service:
        events = service.events()

    [warning] = [e for e in events if e.get("event") == "key file readable by others"]
    assert warning["path"] == str(api_keys)
    assert KEY not in service.output
