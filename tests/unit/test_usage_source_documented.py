"""OBSERVABILITY.md's trailing-metadata table explains every `x-usage-source` value."""

from __future__ import annotations

from pathlib import Path

from rerank_service.api.http.openapi import document

ROOT = Path(__file__).resolve().parents[2]


def test_every_usage_source_the_service_sends_is_explained_in_observability() -> None:
    # The HTTP API's contract (its OpenAPI header enum) names every value gRPC sends too.
    sources = {
        value
        for operations in document()["paths"].values()
        for operation in operations.values()
        for response in operation.get("responses", {}).values()
        for value in response.get("headers", {}).get("x-usage-source", {}).get("schema", {}).get("enum", ())
    }
    assert {"upstream", "cache"} <= sources, "the x-usage-source enum moved?"
    page = (ROOT / "docs" / "OBSERVABILITY.md").read_text(encoding="utf-8")
    (row,) = [line for line in page.splitlines() if line.startswith("| `x-usage-source` |")]

    assert {source for source in sources if f"`{source}`" not in row} == set()
