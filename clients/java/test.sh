#!/usr/bin/env bash
# Runs the Java client's tests against a LIVE rerank-service:
#   RERANK_TARGET=host:port (plaintext) RERANK_API_KEY=<key> clients/java/test.sh
# The tests fail (never skip) when RERANK_TARGET is unset. The environment passes
# through to the tests. Exit status is non-zero when any test fails or the build breaks.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
reports="$here/target/surefire-reports"
rm -rf "$reports"

# -q keeps Maven quiet (failures are still printed); sed drops the bare colour-reset
# codes some Maven distributions emit even in batch mode.
mvn -B -q -Dstyle.color=never -f "$here/pom.xml" test "$@" 2>&1 | sed -e 's/\x1b\[[0-9;]*m//g' -e '/^$/d'
rc=${PIPESTATUS[0]}

# Surefire's own "Tests run" line is INFO level, which -q hides: print the totals.
if compgen -G "$reports/TEST-*.xml" > /dev/null; then
  awk 'match($0, /<testsuite [^>]*>/) {
         s = substr($0, RSTART, RLENGTH)
         n = split("tests failures errors skipped", keys, " ")
         for (i = 1; i <= n; i++) if (match(s, keys[i] "=\"[0-9]+\"")) {
           v = substr(s, RSTART, RLENGTH); gsub(/[^0-9]/, "", v); tot[keys[i]] += v }
       }
       END { printf "java client tests: %d run, %d failures, %d errors, %d skipped\n",
             tot["tests"], tot["failures"], tot["errors"], tot["skipped"] }' "$reports"/TEST-*.xml
fi
exit "$rc"
