"""`rerank-service usage --metrics URL`: each caller's totals, read back from a running
server's Prometheus endpoint (the `rerank_caller_*` counters; with `--workers N`, the
supervisor's sum) and printed as a table."""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class CallerTotals:
    """One caller's totals for one model."""

    calls: float = 0.0
    ok: float = 0.0
    documents: float = 0.0
    tokens: dict[str, float] = field(default_factory=dict)  # by source
    cached_tokens: float = 0.0
    backend_calls: float = 0.0


@dataclass
class Usage:
    by_model: dict[tuple[str, str], CallerTotals]  # (caller, model)
    limited: dict[str, dict[str, float]]  # caller → limit → calls refused


def read_usage(metrics_text: str) -> Usage:
    """The callers' totals in a Prometheus text exposition."""
    by_model: dict[tuple[str, str], CallerTotals] = defaultdict(CallerTotals)
    limited: dict[str, dict[str, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if not sample.name.endswith("_total") or "caller" not in labels:
                continue
            name = sample.name.removesuffix("_total")
            if name == "rerank_caller_limited":
                limited[labels["caller"]][labels["limit"]] = sample.value
                continue
            totals = by_model[labels["caller"], labels.get("model", "")]
            if name == "rerank_caller_calls":
                totals.calls += sample.value
                if labels.get("code") == "OK":
                    totals.ok += sample.value
            elif name == "rerank_caller_documents":
                totals.documents += sample.value
            elif name == "rerank_caller_tokens":
                totals.tokens[labels["source"]] = totals.tokens.get(labels["source"], 0.0) + sample.value
            elif name == "rerank_caller_cached_tokens":
                totals.cached_tokens += sample.value
            elif name == "rerank_caller_backend_calls":
                totals.backend_calls += sample.value
    return Usage(dict(by_model), dict(limited))


def fetch_usage(url: str, timeout: float = 10.0, direct: bool = False) -> Usage:
    """The usage the /metrics at `url` shows; `direct`: past any proxy the environment
    names (this machine's own server: urllib would take http_proxy for it too)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if direct else None
    open_url = urllib.request.urlopen if opener is None else opener.open
    with open_url(url, timeout=timeout) as response:
        return read_usage(response.read().decode("utf-8"))


COLUMNS = (
    "caller",
    "model",
    "calls",
    "ok",
    "documents",
    "tokens",
    "token sources",
    "cached tokens",
    "chunks",
)


def table(usage: Usage) -> str:
    """The totals as an aligned text table, one row per caller and model, then the refusals."""
    rows = [COLUMNS]
    for (caller, model), totals in sorted(usage.by_model.items()):
        sources = ", ".join(f"{source} {value:.0f}" for source, value in sorted(totals.tokens.items()))
        rows.append(
            (
                caller,
                model,
                f"{totals.calls:.0f}",
                f"{totals.ok:.0f}",
                f"{totals.documents:.0f}",
                f"{sum(totals.tokens.values()):.0f}",
                sources or "-",
                f"{totals.cached_tokens:.0f}",
                f"{totals.backend_calls:.0f}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    if usage.limited:
        lines += ["", "refused for a limit:"]
        for caller, limits in sorted(usage.limited.items()):
            refused = ", ".join(f"{limit} {count:.0f}" for limit, count in sorted(limits.items()))
            lines.append(f"  {caller}: {refused}")
    return "\n".join(lines)
