#!/usr/bin/env bash
# ghz, the gRPC load generator `make bench-perf` drives, pinned, built from the Go module
# proxy into .ci/tools/go/bin (ignored by git). Kept out of `make tools`: tests never need it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.ci/tools/go/bin"
mkdir -p "$bin"
export GOBIN="$bin" GOFLAGS=-mod=mod
[[ -x "$bin/ghz" ]] || go install github.com/bojand/ghz/cmd/ghz@v0.121.0
