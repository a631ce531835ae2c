#!/usr/bin/env bash
# The fast upstream of `make bench-perf`: nginx from Debian's packages, installed once.
# Idempotent; the benchmark runs its own nginx (generated config, loopback, foreground),
# so the package's own service is kept from starting.
set -euo pipefail
command -v nginx >/dev/null 2>&1 && exit 0
[[ -x /usr/sbin/nginx ]] && exit 0
exec bash "$(dirname "$0")/../.ci/apt-install-quiet.sh" "nginx-light|nginx"
