"""An upstream deployment's tokenizer (`tokenizer:`) at a reload. Reading a tokenizer.json
holds the event loop (the `tokenizers` library keeps Python's lock while it parses: a 6 MB
file, about 0.3 s, during which every call and health check waits), so a file a deployment
already uses is not read again: a reload that changes a deployment's other settings, or
adds another deployment naming the same file, reads nothing; a file changed on disk is
read again. A reload whose tokenizer cannot be read is refused, the routes kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import tokenizers
import yaml
from rerank.v1 import rerank_pb2

from rerank_service.backends.local.model_files import bundled_model_path
from rerank_service.config import ConfigError, Settings
from rerank_service.config.sources import load_settings
from rerank_service.routing import Router
from rerank_service.routing.build import build_router, checked_routes
from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY
from tests.support.logs import LogCapture
from tests.support.server import ServerThread

KEY_ENV = "RELOAD_TOKENIZER_TEST_UPSTREAM_KEY"


def _write(path: Path, upstream: FakeUpstream, also: dict[str, Any] | None = None, **deployment: Any) -> Path:
    """The route `search` on the deployment `remote` (with `deployment`'s settings), and on
    `also` (with its settings) after it if given."""
    entries = [{"name": "remote", **deployment}] + ([{"name": "also", "priority": 1, **also}] if also else [])
    common = {"format": "dashscope", "url": upstream.url, "model": "qwen3-rerank", "api_key_env": KEY_ENV}
    document = {"models": [{"name": "search", "deployments": [{**common, **entry} for entry in entries]}]}
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def _load(path: Path) -> Settings:
    return load_settings({"config": str(path)}, env={KEY_ENV: UPSTREAM_KEY})


def _not_a_tokenizer(tmp_path: Path) -> Path:
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": 7}', encoding="utf-8")
    return directory


def _router(server: ServerThread) -> Router:
    assert server.server is not None
    router = server.server.backend
    assert isinstance(router, Router)
    return router


def _call(server: ServerThread) -> None:
    answer = server.stub.Rerank(
        rerank_pb2.RerankRequest(model="search", query="red apple", documents=["a red apple", "a car"]),
        timeout=30,
    )
    assert len(answer.output.results) == 2


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files `tokenizers.Tokenizer.from_file` reads from now on."""
    read: list[str] = []
    from_file = tokenizers.Tokenizer.from_file

    def recorded(path: str) -> tokenizers.Tokenizer:
        read.append(path)
        return from_file(path)

    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", recorded)
    return read


def _copied_tokenizer(tmp_path: Path) -> Path:
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    shutil.copy(bundled_model_path() / "tokenizer.json", directory / "tokenizer.json")
    return directory


def test_a_reload_reads_no_tokenizer_a_deployment_already_uses(
    tmp_path: Path, upstream: FakeUpstream, reads: list[str]
) -> None:
    tokenizer = str(_copied_tokenizer(tmp_path))
    config = _write(tmp_path / "routes.yaml", upstream, tokenizer=tokenizer)
    with ServerThread(_load(config)) as server:
        assert len(reads) == 1
        before = _router(server).call_limits("search").window
        # The deployment rebuilt (its timeout changed), and a second one on the same file.
        _write(config, upstream, tokenizer=tokenizer, timeout=9, also={"tokenizer": tokenizer})
        assert server.server is not None
        accepted = server.run(server.server.reload(lambda: _load(config)))
        router = _router(server)
        after = router.call_limits("search").window
        rebuilt = sorted(deployment.name for deployment in router.deployments)
        _call(server)

    assert accepted
    assert rebuilt == ["also", "remote"]
    assert len(reads) == 1  # read at start only
    assert before is not None
    assert after is not None
    assert after is not before
    assert after.counted_by == "tokenizer"
    assert after.measure("Hello wörld, 漢字 and more").tokens == 7


def test_a_reload_reads_a_tokenizer_changed_on_disk_again(
    tmp_path: Path, upstream: FakeUpstream, reads: list[str]
) -> None:
    directory = _copied_tokenizer(tmp_path)
    config = _write(tmp_path / "routes.yaml", upstream, tokenizer=str(directory))
    with ServerThread(_load(config)) as server:
        file = directory / "tokenizer.json"
        file.write_bytes(file.read_bytes())  # written again: another file for the reload
        changed = file.stat().st_mtime_ns + 1_000_000_000  # whatever the clock's resolution
        os.utime(file, ns=(changed, changed))
        _write(config, upstream, tokenizer=str(directory), timeout=9)
        assert server.server is not None
        accepted = server.run(server.server.reload(lambda: _load(config)))

    assert accepted
    assert len(reads) == 2


def test_a_reload_whose_tokenizer_cannot_be_read_is_refused_and_the_routes_kept(
    tmp_path: Path, upstream: FakeUpstream, logs: LogCapture
) -> None:
    config = _write(tmp_path / "routes.yaml", upstream)
    with ServerThread(_load(config)) as server:
        before = list(_router(server).deployments)
        _write(config, upstream, tokenizer=str(_not_a_tokenizer(tmp_path)))
        assert server.server is not None
        accepted = server.run(server.server.reload(lambda: _load(config)))
        after = list(_router(server).deployments)
        _call(server)

    assert not accepted
    assert after == before
    [refused] = [event for event in logs.events() if event["event"] == "reload refused"]
    assert "upstream-tokenizer" in refused["error"]
    assert "cannot read" in refused["error"]


def test_start_up_and_check_config_refuse_a_tokenizer_that_cannot_be_read(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    settings = _load(_write(tmp_path / "routes.yaml", upstream, tokenizer=str(_not_a_tokenizer(tmp_path))))

    for build in (checked_routes, build_router):
        with pytest.raises(ConfigError) as caught:
            build(settings)
        assert str(caught.value).startswith("models[0].deployments[0]: upstream-tokenizer ")
        assert "cannot read" in str(caught.value)
