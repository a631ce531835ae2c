#!/usr/bin/env bash
# The Redis server the tests share their state through (the score cache's shared tier, the
# callers' limits store): Debian's redis-server package, installed once. Idempotent; the
# tests start their own redis-server (tests/support/redis_server.py: a free loopback port,
# no persistence), so the package's own service is kept from starting.
set -euo pipefail
command -v redis-server >/dev/null 2>&1 && exit 0
[[ -x /usr/bin/redis-server ]] && exit 0
exec bash "$(dirname "$0")/../../.ci/apt-install-quiet.sh" redis-server
