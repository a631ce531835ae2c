"""The README and docs/ pages stay true to the code and to each other.

Each page states facts the code can check: the make targets it tells people to run,
the metrics, ErrorInfo reasons and commands it documents, and the links between
pages. These tests fail when a page and the code drift apart, or when a page links
something that does not exist in a fresh clone.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# A page this long is not read top to bottom: it opens with a table of contents.
LONG_PAGE_LINES = 150
README_MAX_LINES = 200


def product_docs() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def prose(text: str) -> str:
    """The text outside fenced code blocks and HTML comments."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    kept, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(line)
    return "\n".join(kept)


_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text: str) -> list[str]:
    """Every inline link target in the page's prose (code spans are not links)."""
    return _LINK.findall(_INLINE_CODE.sub("x", prose(text)))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    kept = "".join(char for char in text if char in " -_" or unicodedata.category(char)[0] in ("L", "N"))
    return kept.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(found)


@pytest.mark.parametrize("doc", product_docs(), ids=doc_id)
def test_every_relative_link_resolves_to_a_file_and_anchor_in_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE):
            if not target.startswith("https://"):
                broken.append(f"{target}: a link that leaves the repository must be https")
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (doc.parent / unquote(path_part)).resolve() if path_part else doc
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: points outside the repository")
            continue
        if not resolved.exists():
            broken.append(f"{target}: no such file")
            continue
        if fragment and resolved.suffix == ".md" and unquote(fragment) not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{fragment} in {doc_id(resolved)}")
    assert not broken, f"{doc_id(doc)} has broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("doc", product_docs(), ids=doc_id)
def test_no_product_doc_points_into_the_shared_folder_outside_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for outside in ("../shared", "shared/reference"):
        assert outside not in text, f"{doc_id(doc)} mentions {outside!r}, which no clone has"


def test_readme_stays_short_and_links_every_docs_page() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    linked = {target.partition("#")[0] for target in links(text)}
    pages = {f"docs/{path.name}" for path in DOCS.glob("*.md")}
    assert pages <= linked, f"README does not link {sorted(pages - linked)}"


@pytest.mark.parametrize("doc", product_docs(), ids=doc_id)
def test_a_long_page_opens_with_a_table_of_contents(doc: Path) -> None:
    lines = doc.read_text(encoding="utf-8").splitlines()
    if len(lines) <= LONG_PAGE_LINES:
        return
    first = next(i for i, line in enumerate(lines) if line.startswith("## "))
    assert lines[first] == "## Contents", f"{doc_id(doc)} is long and does not open with its contents"
    contents_end = next((i for i in range(first + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    listed = {target.removeprefix("#") for target in links("\n".join(lines[first:contents_end]))}
    headings = prose("\n".join(lines[contents_end:])).splitlines()
    sections = {github_slug(line[3:]) for line in headings if line.startswith("## ")}
    assert sections <= listed, f"{doc_id(doc)}'s contents miss {sorted(sections - listed)}"


@pytest.mark.parametrize("doc", sorted(DOCS.glob("*.md")), ids=doc_id)
def test_every_docs_page_opens_with_a_summary_paragraph(doc: Path) -> None:
    lines = doc.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ")
    first = next(line for line in lines[1:] if line.strip())
    assert not first.startswith(("#", "|", "-", "*", "```", "<!--")), f"{doc_id(doc)} starts with {first!r}"


def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.MULTILINE))


@pytest.mark.parametrize("doc", product_docs(), ids=doc_id)
def test_every_make_command_a_page_mentions_is_a_makefile_target(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    mentioned = set(re.findall(r"`make ([a-z][\w-]*\*?)", text))
    mentioned |= set(re.findall(r"^(?:[A-Z_]+=\S+ )*make ([a-z][\w-]*\*?)", text, flags=re.MULTILINE))
    targets = make_targets()
    unknown = {
        name
        for name in mentioned
        if not (  # `make bench-*` names a family of targets
            any(target.startswith(name[:-1]) for target in targets) if name.endswith("*") else name in targets
        )
    }
    assert unknown == set(), f"{doc_id(doc)} mentions make targets the Makefile lacks"


def test_readme_says_what_the_two_commands_do() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make serve" in text
    assert "make test" in text
    assert {"serve", "test"} <= make_targets()


def test_every_metric_the_service_registers_is_documented_in_observability() -> None:
    from rerank_service.observability.metrics import Metrics

    names = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics().registry.collect()
        if family.name.startswith("rerank_")
    }
    assert names, "no rerank_ metrics found: the registry moved?"
    documented = page("OBSERVABILITY.md")
    assert {name for name in names if f"`{name}`" not in documented} == set()


def errorinfo_reasons() -> set[str]:
    reasons: set[str] = set()
    for source in (ROOT / "rerank_service").rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        reasons |= set(re.findall(r'reason="([A-Z][A-Z_]+)"', text))
        reasons |= set(re.findall(r'error\(\s*grpc\.StatusCode\.\w+,\s*"([A-Z][A-Z_]+)"', text))
    # Reasons named once as constants (backends/upstream/errors.py) and used by name.
    errors = (ROOT / "rerank_service" / "backends" / "upstream" / "errors.py").read_text(encoding="utf-8")
    reasons |= set(re.findall(r'^[A-Z_]+ = "(UPSTREAM_[A-Z_]+)"', errors, flags=re.MULTILINE))
    return reasons


def test_every_errorinfo_reason_the_service_sends_is_explained_in_errors() -> None:
    reasons = errorinfo_reasons()
    assert {"OVERLOADED", "UPSTREAM_TIMEOUT", "MODEL_NOT_FOUND"} <= reasons, "reason search found too little"
    explained = {
        match.group(1) for match in re.finditer(r"^\| `([A-Z_]+)` \|", page("ERRORS.md"), flags=re.MULTILINE)
    }
    assert reasons - explained == set(), "reasons sent but not explained in docs/ERRORS.md"


def test_every_cli_command_is_documented_in_operations() -> None:
    from rerank_service.cli import _parser

    commands = {
        name
        for action in _parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }
    assert commands >= {"serve", "rerank", "models", "health"}
    documented = page("OPERATIONS.md")
    assert {name for name in commands if f"`rerank-service {name}" not in documented} == set()


def test_the_upstream_formats_table_says_what_each_dialect_declares() -> None:
    """Each format's default path and documents per call are declared once, in its module;
    docs/UPSTREAMS.md's table must say the same."""
    from rerank_service.backends.upstream.dialect import DialectOptions
    from rerank_service.backends.upstream.dialects import DIALECTS, build_dialect

    rows = {
        match.group(1): (match.group(2), int(match.group(3)))
        for match in re.finditer(
            r"^\| `(\w+)` \| `(/[^`]*)` \|.*\| (\d+)[^|]*\|$", page("UPSTREAMS.md"), flags=re.MULTILINE
        )
    }
    declared = {}
    for name in DIALECTS:
        dialect = build_dialect(name, DialectOptions())
        declared[name] = (dialect.path, dialect.documents_per_call)

    assert rows == declared
