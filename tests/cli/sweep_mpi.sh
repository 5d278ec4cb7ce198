#!/usr/bin/env bash
# sweep_mpi.sh KVSCOPE MPIEXEC TRACE DIR
# `mpiexec -n 3 kvscope sweep` on one machine: every rank runs its share of the
# cells, rank 0 gathers one result file with the same numbers as one process,
# and a bad input stops every rank with one error (no rank left waiting).
set -euo pipefail
kvscope=$1 mpiexec=$2 trace=$3 dir=$4
rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
fail() { printf 'FAIL: %s\n' "$*"; exit 1; }
# Open MPI refuses root without these (CI runs as root) and 3 ranks on 2 cores without oversubscribe.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# Under `make test-sanitize`: Open MPI's runtime leaks by design (MCA components it
# dlopens and never frees), which LeakSanitizer cannot suppress by name; ASan
# and UBSan still check every rank. Our own code's leaks are checked by the
# single-process sweep test.
if [ -n "${ASAN_OPTIONS:-}" ]; then export ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0"; fi
mpi() { timeout 300 "$mpiexec" -n "$@"; }
numbers() { cut -d, -f1-21 "$1"; }
methods=full,snapkv,h2o,tova,streaming_llm budgets=50%,25%

"$kvscope" sweep "$trace" --method $methods --budget $budgets --out one.json >/dev/null 2>&1
mpi 3 "$kvscope" sweep "$trace" --method $methods --budget $budgets --out three.json --jobs 1 >out 2>err \
  || { cat out err; fail "mpiexec -n 3 sweep failed"; }
for r in 0 1 2; do
  grep -q "^\[rank $r " err || { cat err; fail "rank $r ran no cell"; }
done
[ "$(grep -c '^\[rank ' err)" -eq 10 ] || { cat err; fail "10 cells should run exactly once in all"; }
grep -q '"complete": true' three.json || fail "the gathered result is not complete"
[ "$(numbers three.csv)" = "$(numbers one.csv)" ] || fail "3 ranks and 1 process give different numbers"
ls three.json.journal-* 2>/dev/null && fail "journals of a complete sweep must be removed"

# Resume under MPI: cells finished by the single-process run are skipped.
mpi 2 "$kvscope" sweep "$trace" --method $methods,knorm --budget $budgets --out one.json >out 2>err \
  || { cat out err; fail "resumed mpiexec sweep failed"; }
grep -q '12 cells, 10 finished earlier, 2 to run on 2 ranks' err || { cat err; fail "MPI resume"; }

# A bad method: every rank stops with a usage error, rank 0 says why.
set +e
mpi 2 "$kvscope" sweep "$trace" --method nope --budget 50% --out bad.json >out 2>&1
got=$?
set -e
[ "$got" -ne 0 ] || fail "a bad method under mpiexec exited 0"
grep -q "unknown method 'nope'" out || { cat out; fail "rank 0 did not report the bad method"; }
echo PASS
