"""The README's configuration table is the one config.py generates, so docs cannot drift."""

from __future__ import annotations

from pathlib import Path

from rerank_service.config.settings import markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_table_matches_the_settings() -> None:
    assert markdown_table() in README.read_text(encoding="utf-8")
