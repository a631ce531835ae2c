"""The contract checks themselves: buf breaking catches a breaking change, and lint runs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".ci" / "tools" / "node_modules" / ".bin" / "buf"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def contract_repo(tmp_path: Path) -> Path:
    """A git repository holding today's contract as its one commit on main."""
    assert BUF.exists(), f"buf is missing at {BUF}: run `make tools` (npm ci --prefix .ci/tools)"
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    for command in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "add", "."],
        ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-q", "-m", "contract"],
    ):
        assert run(*command, cwd=tmp_path).returncode == 0
    return tmp_path


def edit_contract(repo: Path, old: str, new: str) -> None:
    proto = repo / "proto" / "rerank" / "v1" / "rerank.proto"
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new, 1))


def test_renaming_a_field_is_caught_as_breaking(contract_repo: Path) -> None:
    edit_contract(contract_repo, "  string query = 2;", "  string question = 2;")

    result = run(str(BUF), "breaking", "--against", ".git#branch=main", cwd=contract_repo)

    assert result.returncode != 0
    assert "question" in result.stdout + result.stderr


def test_adding_a_field_is_not_breaking(contract_repo: Path) -> None:
    edit_contract(
        contract_repo,
        "  bool return_documents = 6;\n",
        "  bool return_documents = 6;\n  // A new optional knob, added compatibly.\n  bool explain = 99;\n",
    )

    result = run(str(BUF), "breaking", "--against", ".git#branch=main", cwd=contract_repo)

    assert result.returncode == 0, result.stdout + result.stderr


def test_an_undocumented_field_fails_lint(contract_repo: Path) -> None:
    edit_contract(
        contract_repo,
        "  bool return_documents = 6;\n",
        "  bool return_documents = 6;\n  bool explain = 99;\n",
    )

    result = run(str(BUF), "lint", cwd=contract_repo)

    assert result.returncode != 0
    assert "explain" in result.stdout + result.stderr
