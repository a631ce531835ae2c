#!/usr/bin/env bash
# tools.sh: install the pinned Go codegen plugins into <repo>/.ci/tools/go/bin.
# Idempotent: a plugin already installed at the pinned version is left alone.
set -euo pipefail

PROTOC_GEN_GO_VERSION=v1.36.12      # google.golang.org/protobuf/cmd/protoc-gen-go (matches the runtime in go.mod)
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2   # google.golang.org/grpc/cmd/protoc-gen-go-grpc

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/../.." && pwd)"
gobin="${repo_root}/.ci/tools/go/bin"
mkdir -p "${gobin}"

# install NAME PACKAGE MODULE VERSION
install() {
  local name="$1" pkg="$2" module="$3" version="$4" bin="${gobin}/$1"
  if [[ -x "${bin}" ]] && go version -m "${bin}" 2>/dev/null \
      | awk -v m="${module}" -v v="${version}" '$1 == "mod" && $2 == m && $3 == v { found = 1 } END { exit !found }'; then
    return 0
  fi
  echo "installing ${name} ${version}" >&2
  GOBIN="${gobin}" go install "${pkg}@${version}"
}

install protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go \
  google.golang.org/protobuf "${PROTOC_GEN_GO_VERSION}"
install protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc \
  google.golang.org/grpc/cmd/protoc-gen-go-grpc "${PROTOC_GEN_GO_GRPC_VERSION}"
