"""The backend setting picks the backend behind the routes; the local one names its missing extra."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from rerank_service.backends.local import LocalBackend
from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.config import ConfigError, Settings
from rerank_service.core.backend import Backend
from rerank_service.routing.build import build_router


def build_backend(settings: Settings) -> Backend:
    """The one deployment the flags describe, behind its routes."""
    [deployment] = build_router(settings).deployments
    return deployment.backend


def test_the_default_backend_is_the_local_one_with_the_bundled_model() -> None:
    backend = build_backend(Settings())

    assert isinstance(backend, LocalBackend)
    assert [model.name for model in backend.models()] == ["all-minilm-l6-v2"]


def test_the_upstream_backend_is_chosen_by_name() -> None:
    assert isinstance(build_backend(Settings(backend="upstream")), UpstreamBackend)


def test_the_local_backend_without_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def without_torch(name: str, *args: Any) -> Any:
        return None if name == "torch" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_torch)

    with pytest.raises(ConfigError, match=r"rerank-service\[local\]"):
        build_backend(Settings())
