#!/usr/bin/env bash
# Fuzz rram's parsers (tests/fuzz/targets/*, one per parser) from the checked-in corpus
# (tests/fuzz/corpus/<target>/): atheris (libFuzzer) when installed, else tests/fuzz/driver.py's
# mutational loop.  Runs at nice 19.  Any finding (an exception other than the parser's typed
# error, a crash, an input over 1 s, RSS over 2 GiB) fails the run; its input is in
# build/fuzz/findings/.  New inputs go to build/fuzz/<target>/, logs to build/fuzz/<target>.log.
#
#   scripts/fuzz.sh                     every target for 20 s
#   scripts/fuzz.sh --long              every target for 200,000 inputs (1.4 million in all), then
#                                       5,000 inputs of each kind through live servers (--live 5000)
#   scripts/fuzz.sh --runs N [TARGET..] N inputs per target;  --time S: S seconds per target
#   scripts/fuzz.sh --live N            N inputs of each kind through a real provider process and
#                                       a live NBD server (tests/fuzz/test_live_*.py; CI runs 100)
#   scripts/fuzz.sh --merge ...         then fold the new inputs that add coverage into the corpus
#                                       (libFuzzer -merge=1: the smallest inputs that keep it)
#
# The short CI run is tests/fuzz/test_fuzz_short.py (part of scripts/test.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${RRAM_PYTHON:-.venv/bin/python}
limit=(-max_total_time=20)
merge=0
live=0
targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --long) limit=(-runs=200000); live=5000 ;;
    --live) live=$2; shift ;;
    --runs) limit=(-runs="$2"); shift ;;
    --time) limit=(-max_total_time="$2"); shift ;;
    --merge) merge=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "usage: $0 [--long | --runs N | --time S] [--live N] [--merge] [TARGET...]" >&2; exit 2 ;;
    *) targets+=("$1") ;;
  esac
  shift
done
if [ ${#targets[@]} = 0 ]; then
  for f in tests/fuzz/targets/[a-z]*.py; do targets+=("$(basename "$f" .py)"); done
fi
OUT=build/fuzz
mkdir -p "$OUT/findings"
"$PY" -c 'import atheris' 2>/dev/null && engine=atheris || engine="mutate (atheris not installed)"
echo "fuzz: engine $engine; ${limit[*]} per target"
failed=()
for t in "${targets[@]}"; do
  [ -f "tests/fuzz/targets/$t.py" ] || { echo "fuzz: no target $t" >&2; exit 2; }
  mkdir -p "$OUT/$t"
  start=$(date +%s)
  nice -n 19 "$PY" -m "tests.fuzz.targets.$t" "${limit[@]}" -timeout=1 -rss_limit_mb=2048 \
    -artifact_prefix="$OUT/findings/$t-" -print_final_stats=1 "$OUT/$t" "tests/fuzz/corpus/$t" >"$OUT/$t.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  runs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+|^Done [0-9]+ runs' "$OUT/$t.log" | grep -oE '[0-9]+' | tail -1)
  runs=${runs:-?}
  rate=$([ "$runs" != "?" ] && [ "$secs" -gt 0 ] && echo $(( runs / secs )) || echo "?")
  if [ $rc = 0 ]; then
    printf 'fuzz: %-14s %9s inputs %5s s %7s exec/s  no finding\n' "$t" "$runs" "$secs" "$rate"
  else
    printf 'fuzz: %-14s %9s inputs %5s s %7s exec/s  FINDING (exit %s), see %s\n' "$t" "$runs" "$secs" "$rate" \
      "$rc" "$OUT/$t.log"
    grep -E 'Error|assert|Test unit written|FINDING' "$OUT/$t.log" | head -5 | sed 's/^/      /'
    failed+=("$t")
  fi
  if [ $merge = 1 ] && [ $rc = 0 ] && [ "$engine" = atheris ]; then
    nice -n 19 "$PY" -m "tests.fuzz.targets.$t" -merge=1 "tests/fuzz/corpus/$t" "$OUT/$t" >>"$OUT/$t.log" 2>&1 \
      && grep -E 'MERGE-OUTER: [0-9]+ new files' "$OUT/$t.log" | tail -1 | sed "s/^/fuzz: $t corpus: /"
  fi
done
if [ "$live" -gt 0 ]; then
  start=$(date +%s)
  if RRAM_FUZZ_LIVE_RUNS=$live nice -n 19 "$PY" -m pytest -p no:cacheprovider -q tests/fuzz/test_live_provider.py \
      tests/fuzz/test_live_nbd.py >"$OUT/live.log" 2>&1; then
    echo "fuzz: live servers: $live inputs of each of 4 kinds in $(( $(date +%s) - start )) s, no finding"
  else
    echo "fuzz: live servers: FINDING, see $OUT/live.log"; failed+=(live)
  fi
fi
[ ${#failed[@]} = 0 ] || { echo "fuzz: findings in: ${failed[*]}" >&2; exit 1; }
