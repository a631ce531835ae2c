#!/usr/bin/env bash
# generate.sh: regenerate the checked-in Go stubs (clients/go/rerank/v1/*.pb.go)
# from proto/. Idempotent and deterministic: running it twice gives no diff.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/../.." && pwd)"

bash "${script_dir}/tools.sh"

cd "${repo_root}"
buf=.ci/tools/node_modules/.bin/buf
if [[ ! -x "${buf}" ]]; then
  npm ci --prefix .ci/tools --no-audit --no-fund --loglevel=error
fi

# Remove stale outputs first, so a message or file deleted from proto/ does not linger.
rm -f clients/go/rerank/v1/*.pb.go
"${buf}" generate --template clients/go/buf.gen.yaml
