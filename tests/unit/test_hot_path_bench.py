"""bench/hot_path.py runs, on every test run, as a benchmark and not a timed test: its
in-process path gives the right ranking (it checks), and it prints each part's figure."""

from __future__ import annotations

import re
import subprocess
import sys

PARTS = (
    "whole path",
    "to_domain",
    "engine.rerank (with parse_answer)",
    "of which parse_answer",
    "to_proto",
    "call bookkeeping (open, admit, finish)",
    "of which metrics",
    "of which the access-log line",
    "gRPC handler, bytes to bytes, over the router (no grpc)",
    "the same, the score cache answering every pair",
    "the same, the score cache full, missing every pair",
)


def test_the_hot_path_benchmark_runs_and_reports_every_part() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "bench.hot_path", "--counts", "20", "--iterations", "20", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    for part in PARTS:
        assert re.search(rf"^\s*{re.escape(part)}\s+\d+\.\d$", finished.stdout, re.M), (part, finished.stdout)
