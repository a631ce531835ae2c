#!/usr/bin/env bash
# test.sh: vet and test the Go client against a live server.
#   RERANK_TARGET=127.0.0.1:50051 RERANK_API_KEY=<key> bash clients/go/test.sh
# The tests fail (never skip) when RERANK_TARGET or RERANK_API_KEY is unset.
set -euo pipefail

cd "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Dependencies come from go.mod/go.sum only: go's default -mod=readonly fails
# rather than rewrite them.

if [[ -z "${RERANK_TARGET:-}" ]]; then
  echo "test.sh: RERANK_TARGET is not set; the tests will fail (they need a live rerank-service)" >&2
fi

go vet ./...
RERANK_TARGET="${RERANK_TARGET:-}" RERANK_API_KEY="${RERANK_API_KEY:-}" go test ./... -count=1 -v
