"""docs/CONFIGURATION.md is what the settings' declarations generate, and its example loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rerank_service.config import load_settings
from rerank_service.config.reference import EXAMPLE
from rerank_service.config.settings import options

PAGE = Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md"
COMMAND = "python -m rerank_service.config.reference > docs/CONFIGURATION.md"


def test_the_configuration_page_is_what_the_declarations_generate() -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "rerank_service.config.reference"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert PAGE.read_text(encoding="utf-8") == generated, (
        f"docs/CONFIGURATION.md is out of date with rerank_service/config/settings.py: "
        f"run `make docs` ({COMMAND})"
    )


def test_every_setting_says_what_it_accepts_and_what_it_does() -> None:
    for option in options():
        assert option.help, f"{option.name} has no description"
        assert option.expect or option.keys, f"{option.name} does not say what values it accepts"


def test_the_example_config_file_on_the_page_loads(tmp_path: Path) -> None:
    path = tmp_path / "rerank.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")

    settings = load_settings({"config": str(path)}, {})

    assert settings.backend == "upstream"
    assert settings.upstream_models == ("qwen3-rerank", "gte-rerank-v2")
    assert settings.sources["upstream_timeout"] == f"upstream_timeout in {path}"
