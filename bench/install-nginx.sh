#!/usr/bin/env bash
# The fast upstream of `make bench-perf`: nginx from Debian's packages, installed once.
# Idempotent; the benchmark runs its own nginx (generated config, loopback, foreground),
# so the package's own service is kept from starting.
set -euo pipefail
command -v nginx >/dev/null 2>&1 && exit 0
[[ -x /usr/sbin/nginx ]] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "nginx is missing and there is no apt-get: install nginx, then rerun" >&2
    exit 1
fi
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
# policy-rc.d answering 101 stops the package scripts from starting the system nginx.
policy=/usr/sbin/policy-rc.d
made_policy=""
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    made_policy=1
fi
trap '[[ -z $made_policy ]] || $sudo rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends nginx-light >/dev/null \
    || $sudo apt-get install -y -qq --no-install-recommends nginx >/dev/null
