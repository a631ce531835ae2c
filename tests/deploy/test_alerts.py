"""The alert rules (deploy/prometheus/alerts.yaml) checked by Prometheus's own promtool: the
file is valid (`promtool check rules`) and each alert fires on the series that should fire it
and stays quiet on its look-alikes (`promtool test rules deploy/prometheus/alerts_test.yaml`).
promtool is pinned and built by `make promtool` (.ci/tools/install-go-tools.sh); a missing
one fails the tests. That every metric the rules name is one the service exports is
tests/integration/test_dashboard.py's part.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yaml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yaml"
PROMTOOL = ROOT / ".ci" / "tools" / "go" / "bin" / "promtool"


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    if not (PROMTOOL.is_file() and os.access(PROMTOOL, os.X_OK)):
        pytest.fail(
            f"{PROMTOOL.relative_to(ROOT)} is missing: run `make promtool` (.ci/tools/install-go-tools.sh)",
            pytrace=False,
        )
    return subprocess.run(
        [str(PROMTOOL), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def _alert_names() -> set[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"] for group in rules["groups"] for rule in group["rules"]}


def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", "--lint=all", "--lint-fatal", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_names())} rules found" in result.stdout


def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests() -> None:
    result = _promtool("test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    # Each alert has a case where it fires (exp_alerts not empty) and one where it does not.
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fired == quiet == _alert_names()


def test_a_broken_rule_fails_promtool(tmp_path: Path) -> None:
    """The checks are real: a misspelt metric function and an alert that no longer fires fail."""
    broken_rules = tmp_path / "alerts.yaml"
    broken_rules.write_text(ALERTS.read_text().replace("histogram_quantile(", "histogram_quantil(", 1))
    result = _promtool("check", "rules", broken_rules)
    assert result.returncode != 0
    assert "histogram_quantil" in result.stdout + result.stderr

    quiet_rules = tmp_path / "quiet" / "alerts.yaml"
    quiet_rules.parent.mkdir()
    quiet_rules.write_text(ALERTS.read_text().replace("> 0.05", "> 0.5", 1))
    (quiet_rules.parent / "alerts_test.yaml").write_text(ALERTS_TEST.read_text())
    result = _promtool("test", "rules", quiet_rules.parent / "alerts_test.yaml")
    assert result.returncode != 0
    assert "RerankModelErrorRatioHigh" in result.stdout + result.stderr
