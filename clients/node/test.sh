#!/usr/bin/env bash
# Installs (npm ci), type-checks and builds (tsc), then runs the integration tests
# (node --test) against the live server at RERANK_TARGET with key RERANK_API_KEY.
# The tests FAIL when RERANK_TARGET is unset. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

npm ci --no-audit --no-fund --loglevel=error
rm -rf dist
npx --no-install tsc -p .
node --test --test-reporter=spec dist/test/
