#!/usr/bin/env bash
# expect_exit.sh CODE PATTERN -- COMMAND...
# Runs COMMAND; passes when it exits with CODE and its stdout+stderr match the
# extended regex PATTERN (empty pattern: anything).
set -u
code=$1 pattern=$2
shift 3
out=$("$@" 2>&1)
got=$?
if [ "$got" -ne "$code" ]; then
  printf 'expected exit %s, got %s from: %s\n%s\n' "$code" "$got" "$*" "$out"
  exit 1
fi
if [ -n "$pattern" ] && ! grep -Eq -- "$pattern" <<<"$out"; then
  printf 'output of %s does not match /%s/:\n%s\n' "$*" "$pattern" "$out"
  exit 1
fi
exit 0
