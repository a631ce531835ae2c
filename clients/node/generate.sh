#!/usr/bin/env bash
# Regenerates clients/node/src/gen/ from proto/ (plus google/rpc/error_details.proto
# from the pinned npm package google-proto-files) with the LOCAL protoc-gen-es.
# Deterministic: running it twice leaves no diff.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

# The plugin (protoc-gen-es) and google-proto-files come from this package's lockfile.
if [[ ! -x "$here/node_modules/.bin/protoc-gen-es" || ! -d "$here/node_modules/google-proto-files/google/rpc" ]]; then
  npm ci --prefix "$here" --no-audit --no-fund --loglevel=error
fi

# buf itself is pinned in .ci/tools (the repository's contract-check tools).
buf="$root/.ci/tools/node_modules/.bin/buf"
if [[ ! -x "$buf" ]]; then
  npm ci --prefix "$root/.ci/tools" --no-audit --no-fund --loglevel=error
fi

cd "$root"
"$buf" generate --template clients/node/buf.gen.yaml
echo "generated clients/node/src/gen/"
