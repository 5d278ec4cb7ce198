#!/usr/bin/env bash
# sweep_resume.sh KVSCOPE TRACE DIR
# `kvscope sweep` end to end on one machine: results file and CSV twin, resume
# after a finished run and after a kill (journal with a torn last line),
# jobs-independent numbers, and one clear error per bad input.
set -euo pipefail
kvscope=$1 trace=$2 dir=$3
rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
fail() { printf 'FAIL: %s\n' "$*"; exit 1; }
expect() {  # expect PATTERN FILE
  grep -Eq -- "$1" "$2" || { printf 'FAIL: /%s/ not in %s:\n' "$1" "$2"; cat "$2"; exit 1; }
}
# Every column but the last (seconds): the numbers a run must reproduce.
numbers() { cut -d, -f1-21 "$1"; }

# A finished sweep, then a bigger one into the same file: only the new cells run.
"$kvscope" sweep "$trace" --method full,snapkv --budget 50% --out r.json >out1 2>err1
expect '2 cells, 0 finished earlier, 2 to run' err1
expect '"complete": true' r.json
[ "$(wc -l <r.csv)" -eq 3 ] || fail "r.csv should have a header and 2 rows"
"$kvscope" sweep "$trace" --method full,snapkv,h2o --budget 50% --out r.json >out2 2>err2
expect '3 cells, 2 finished earlier, 1 to run' err2
expect '^h2o +50%' out2
[ "$(wc -l <r.csv)" -eq 4 ] || fail "r.csv should have 3 rows after the resume"
ls r.json.journal-* 2>/dev/null && fail "journals of a complete sweep must be removed"

# A killed sweep: no result file, a journal with one cell and a torn line.
sed -n 2p r.json | sed 's/,$//' >k.json.journal-0
printf '{"backend":"refer' >>k.json.journal-0
"$kvscope" sweep "$trace" --method full,snapkv,h2o --budget 50% --out k.json >out3 2>err3
expect '3 cells, 1 finished earlier, 2 to run' err3
[ "$(numbers k.csv)" = "$(numbers r.csv)" ] || fail "a resumed sweep's numbers differ from an uninterrupted one's"

# One job or two: the same numbers, in the same (grid) order.
"$kvscope" sweep "$trace" --method full,snapkv,h2o --budget 50% --out j1.json --jobs 1 >/dev/null 2>&1
"$kvscope" sweep "$trace" --method full,snapkv,h2o --budget 50% --out j2.json --jobs 2 >/dev/null 2>&1
[ "$(numbers j1.csv)" = "$(numbers j2.csv)" ] || fail "--jobs 1 and --jobs 2 give different numbers"
[ "$(numbers j1.csv)" = "$(numbers r.csv)" ] || fail "a one-go sweep differs from a resumed one"

# --restart ignores finished cells.
"$kvscope" sweep "$trace" --method full --budget 50% --out r.json --restart >/dev/null 2>err4
expect '1 cells, 0 finished earlier, 1 to run' err4

# Bad input: one clear error, non-zero exit, nothing half-written.
bad() {  # bad CODE PATTERN ARGS...
  local code=$1 pattern=$2
  shift 2
  set +e
  "$kvscope" sweep "$@" >bad.out 2>&1
  local got=$?
  set -e
  [ "$got" -eq "$code" ] || { printf 'FAIL: exit %s (want %s) from sweep %s\n' "$got" "$code" "$*"; cat bad.out; exit 1; }
  expect "$pattern" bad.out
}
echo 'not json' >notsweep.json
bad 4 "is not a kvscope sweep result file" "$trace" --method full --budget 50% --out notsweep.json
[ "$(cat notsweep.json)" = "not json" ] || fail "a foreign --out file was overwritten"
bad 2 "names one cell twice" "$trace" --method full,full --budget 50% --out d.json
bad 2 "unknown method 'nope'" "$trace" --method nope --budget 50% --out d.json
bad 6 "cell streaming_llm 4 .*impossible budget|impossible budget" "$trace" --method streaming_llm --budget 4 --out d.json
bad 4 "does_not_exist.h5" does_not_exist.h5 --method full --budget 50% --out d.json
[ -e d.json ] && fail "a sweep that failed validation wrote a result file"
echo PASS
