#!/usr/bin/env bash
# Installs Debian packages whose own service must not start (a server the tests or the
# benchmarks run themselves, on a port of their choosing): apt-get with a policy-rc.d
# answering 101, which keeps the packages' scripts from starting it.
#   bash .ci/apt-install-quiet.sh PACKAGE [PACKAGE...]
# Each argument is one choice; "a|b" installs a, or b when a is not to be had.
set -euo pipefail
if ! command -v apt-get >/dev/null 2>&1; then
    echo "no apt-get here: install $* by hand, then rerun" >&2
    exit 1
fi
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
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
for choice in "$@"; do
    IFS='|' read -r -a alternatives <<<"$choice"
    installed=""
    for package in "${alternatives[@]}"; do
        if $sudo apt-get install -y -qq --no-install-recommends "$package" >/dev/null; then
            installed=1
            break
        fi
    done
    [[ -n $installed ]] || { echo "could not install $choice" >&2; exit 1; }
done
