#!/usr/bin/env bash
# The operators' tools the tests drive, pinned, built from the Go module proxy into
# .ci/tools/go/bin (ignored by git): grpcurl, grpc_health_probe, promtool (the alert rules,
# deploy/prometheus) and jaeger (the trace backend of the tracing tests). Idempotent.
# With arguments, only the tools named: `install-go-tools.sh jaeger`.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/.ci/tools/go/bin"
mkdir -p "$bin"
export GOBIN="$bin" GOFLAGS=-mod=mod

# Jaeger's go.mod has replace directives, which `go install pkg@version` refuses: it is
# built inside a module of ours that pins it as a tool (go.mod and go.sum committed), made
# by `go get -tool <package>@<version>` in that directory; rebuilt when those change.
build_tool() {  # name module-directory package
    local name=$1 module=$root/$2 package=$3
    if [[ -x "$bin/$name" && "$bin/$name" -nt "$module/go.mod" && "$bin/$name" -nt "$module/go.sum" ]]; then
        return
    fi
    echo "building $name from $package ($2/go.mod)"
    # readonly: the committed go.sum is complete; a build never rewrites it
    (cd "$module" && GOFLAGS=-mod=readonly go build -o "$bin/$name.partial" "$package")
    mv "$bin/$name.partial" "$bin/$name"
}

install() {
    case $1 in
        grpcurl) [[ -x "$bin/grpcurl" ]] || go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4 ;;
        grpc-health-probe)
            [[ -x "$bin/grpc-health-probe" ]] || go install github.com/grpc-ecosystem/grpc-health-probe@v0.4.62 ;;
        promtool) [[ -x "$bin/promtool" ]] || go install github.com/prometheus/prometheus/cmd/promtool@v0.316.0 ;;
        jaeger) build_tool jaeger tests/support/jaeger github.com/jaegertracing/jaeger/cmd/jaeger ;;
        *) echo "unknown tool: $1" >&2; exit 2 ;;
    esac
}

if (($# == 0)); then
    set -- grpcurl grpc-health-probe promtool jaeger
fi
for tool in "$@"; do
    install "$tool"
done
