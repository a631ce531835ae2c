#!/usr/bin/env bash
# The operators' tools the tests drive: grpcurl and grpc_health_probe, pinned, built from
# the Go module proxy into .ci/tools/go/bin (ignored by git). Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/.ci/tools/go/bin"
mkdir -p "$bin"
export GOBIN="$bin" GOFLAGS=-mod=mod
[[ -x "$bin/grpcurl" ]] || go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4
[[ -x "$bin/grpc-health-probe" ]] || go install github.com/grpc-ecosystem/grpc-health-probe@v0.4.62
