#!/usr/bin/env bash
# buf breaking: the contract must stay compatible with every earlier version of it.
#
# On a branch other than main: compare with main. On main: compare with each earlier
# commit that changed proto/ (the last 20), so no commit can break a released field.
# Set BUF_BREAKING_AGAINST to a buf input (for example '.git#branch=main') to compare
# with that alone.
set -euo pipefail
buf=${1:?usage: buf-breaking.sh PATH_TO_BUF}
cd "$(git rev-parse --show-toplevel)"

if [[ -n "${BUF_BREAKING_AGAINST:-}" ]]; then
  echo "buf breaking against ${BUF_BREAKING_AGAINST}"
  exec "$buf" breaking --against "$BUF_BREAKING_AGAINST"
fi

branch=$(git rev-parse --abbrev-ref HEAD)
if [[ "$branch" != "main" ]] && git rev-parse -q --verify refs/heads/main >/dev/null; then
  echo "buf breaking against main"
  exec "$buf" breaking --against ".git#branch=main"
fi

checked=0
for commit in $(git log --format=%H -n 20 HEAD~1 -- proto/ 2>/dev/null); do
  git cat-file -e "$commit:proto" 2>/dev/null || continue
  echo "buf breaking against ${commit:0:12}"
  "$buf" breaking --against ".git#ref=$commit"
  checked=$((checked + 1))
done
echo "buf breaking: compatible with ${checked} earlier version(s) of proto/"
