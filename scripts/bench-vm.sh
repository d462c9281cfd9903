#!/usr/bin/env bash
# Benchmarks for the notes (not CI): rram over verbs vs perftest, side by side, in ONE run
# inside the soft-RoCE guest.  The guest prints its results between markers on the console;
# this script cuts them out into $RRAM_BENCH_DIR (default $RXE_LAB/xfer: verbs-bench.json,
# verbs-bench.md, swap-bench.json, redis-bench.json) and prints the table.  Extra arguments go
# to pytest (-k swap_vm: only the swap-bound workload; -k redis: Redis swapping; -k farmem: FarMemory vs
# swap; -k verbs: verbs vs perftest).
set -uo pipefail
cd "$(dirname "$0")/.."
export RXE_LAB=${RXE_LAB:-/var/tmp/rram-rxe-vm}
OUT=${RRAM_BENCH_DIR:-$RXE_LAB/xfer}
mkdir -p "$OUT"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
t0=$SECONDS
# shellcheck disable=SC2016  # expanded in the guest
guest='python -m pytest bench/vm -q -p no:cacheprovider --timeout=600 "$@"; rc=$?
for f in verbs-bench.json verbs-bench.md swap-bench.json redis-bench.json farmem-bench.json; do
  [ -f "$RRAM_BENCH_OUT/$f" ] || continue
  echo "=====BEGIN $f"; base64 -w 100 "$RRAM_BENCH_OUT/$f"; echo "=====END $f"
done
exit $rc'
RXE_DISK_MB=${RXE_DISK_MB:-256} RXE_TIMEOUT=${RXE_TIMEOUT:-1500} scripts/rxe-vm/run env RRAM_BENCH_OUT=/tmp/rram-bench bash -c "$guest" bench "$@" \
  | tee "$log"
rc=${PIPESTATUS[0]}
got=0
for f in verbs-bench.json verbs-bench.md swap-bench.json redis-bench.json farmem-bench.json; do
  # the serial console turns \n into \r\n; base64 keeps the payload intact whatever it does
  tr -d '\r' < "$log" | sed -n "/^=====BEGIN $f\$/,/^=====END $f\$/p" | sed '1d;$d' | base64 -d > "$OUT/$f.tmp" \
    && [ -s "$OUT/$f.tmp" ] && mv "$OUT/$f.tmp" "$OUT/$f" && got=$((got + 1)) && continue
  rm -f "$OUT/$f.tmp"
  echo "bench-vm: no $f came back from the guest (its suite did not run, or failed)" >&2
done
[ "$got" = 0 ] && [ "$rc" = 0 ] && rc=1
echo "bench-vm: exit $rc after $((SECONDS - t0))s; results in $OUT"
[ -f "$OUT/verbs-bench.md" ] && { echo; cat "$OUT/verbs-bench.md"; }
exit "$rc"
