#!/usr/bin/env bash
# hey, the HTTP load generator `make bench-http` drives, pinned, built from the Go module
# proxy into .ci/tools/go/bin (ignored by git), beside ghz. Kept out of `make tools`: tests never need it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.ci/tools/go/bin"
mkdir -p "$bin"
export GOBIN="$bin" GOFLAGS=-mod=mod
[[ -x "$bin/hey" ]] || go install github.com/rakyll/hey@v0.1.5
