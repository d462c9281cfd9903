#!/usr/bin/env bash
# Swap on remote memory: `rram requester` serves the page store over NBD, the kernel's NBD
# client attaches it to /dev/nbdX, and it becomes a swap device.
#
#   scripts/requester.sh up   CONFIG NAME [SIZE] [DEV] [PRIO]   e.g. up cluster.yaml app1 8GiB /dev/nbd0 100
#   scripts/requester.sh down [DEV]
#   scripts/requester.sh status [DEV]
#
# Env: RRAM_NBD_TCP=HOST:PORT attaches over TCP instead of the unix socket; RRAM_RUN (/run/rram).
# Teardown order matters (swap pages live in the requester): swapoff, nbd-client -d, then stop
# the requester, then (elsewhere) the providers.  `down` does it in that order and copes with
# parts already gone without hanging.  Before swapping on NBD read the docstring of
# rram/frontends/requester.py (cgroup memory.max on the workload, vm.min_free_kbytes, mlock).
set -euo pipefail
RUN=${RRAM_RUN:-/run/rram}
RRAM=${RRAM:-"python3 -m rram.frontends.requester"}
STEP_TIMEOUT=${RRAM_STEP_TIMEOUT:-60}
cmd=${1:-}
usage() { echo "usage: $0 up CONFIG NAME [SIZE] [DEV] [PRIO] | down [DEV] | status [DEV]" >&2; exit 2; }

need_nbd() {  # the kernel side: module, device node, client binary
  local dev=$1
  command -v nbd-client >/dev/null || { echo "requester.sh: nbd-client is not installed (apt-get install nbd-client)" >&2; exit 2; }
  [ "$(id -u)" = 0 ] || { echo "requester.sh: needs root (nbd-client, mkswap, swapon)" >&2; exit 2; }
  if [ ! -b "$dev" ]; then
    modprobe nbd nbds_max=16 2>/dev/null || true
    [ -b "$dev" ] || { echo "requester.sh: no block device $dev: this kernel has no nbd module (or it cannot be loaded here; use the soft-RoCE VM, scripts/rxe-vm/run)" >&2; exit 2; }
  fi
}

nbd_busy() { [ -r "/sys/block/$(basename "$1")/pid" ]; }  # attached to a server

up() {
  local config=$1 name=$2 size=${3:-1GiB} dev=${4:-/dev/nbd0} prio=${5:-100}
  [ -r "$config" ] || { echo "requester.sh: cannot read cluster file $config" >&2; exit 2; }
  need_nbd "$dev"
  nbd_busy "$dev" && { echo "requester.sh: $dev is already attached (requester.sh down $dev first)" >&2; exit 1; }
  mkdir -p "$RUN"
  local sock="$RUN/nbd-$(basename "$dev").sock" out="$RUN/requester-$(basename "$dev").out"
  local log="$RUN/requester-$(basename "$dev").log" pidfile="$RUN/requester-$(basename "$dev").pid"
  local listen=()
  [ -n "${RRAM_NBD_TCP:-}" ] && listen=(--listen "$RRAM_NBD_TCP")
  : >"$out"
  # shellcheck disable=SC2086
  nohup $RRAM --config "$config" --name "$name" --export-size "$size" --socket "$sock" "${listen[@]}" \
    >"$out" 2>>"$log" </dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 300); do
    grep -q "^rram requester .* ready " "$out" && break
    kill -0 "$(cat "$pidfile")" 2>/dev/null || { echo "requester.sh: requester exited:" >&2; tail -n 20 "$log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q "^rram requester .* ready " "$out" || { echo "requester.sh: requester not ready after 30 s" >&2; exit 1; }
  cat "$out"
  if [ -n "${RRAM_NBD_TCP:-}" ]; then
    timeout "$STEP_TIMEOUT" nbd-client "${RRAM_NBD_TCP%:*}" "${RRAM_NBD_TCP##*:}" "$dev" -b 4096 -swap
  else
    timeout "$STEP_TIMEOUT" nbd-client -unix "$sock" "$dev" -b 4096 -swap
  fi
  mkswap "$dev" >/dev/null
  swapon -p "$prio" "$dev"
  echo "requester.sh: $dev ($size) is swap with priority $prio"
  swapon --show
}

down() {
  local dev=${1:-/dev/nbd0} base pidfile
  base=$(basename "$dev"); pidfile="$RUN/requester-$base.pid"
  # 1. swapoff: pages come back from remote memory; needs the requester alive
  if grep -q "^$dev " /proc/swaps 2>/dev/null; then
    if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "requester.sh: WARNING: the requester is gone; swapoff of $dev may fail (swapped pages are lost)" >&2
    fi
    timeout "$STEP_TIMEOUT" swapoff "$dev" || echo "requester.sh: swapoff $dev failed or timed out; continuing" >&2
  fi
  # 2. detach the kernel client (only once swap no longer uses it)
  if command -v nbd-client >/dev/null && [ -b "$dev" ] && nbd_busy "$dev"; then
    if grep -q "^$dev " /proc/swaps 2>/dev/null; then
      echo "requester.sh: $dev is still swap; not detaching it (processes would get I/O errors)" >&2
      exit 1
    fi
    timeout "$STEP_TIMEOUT" nbd-client -d "$dev" || echo "requester.sh: nbd-client -d $dev failed; continuing" >&2
  fi
  # 3. stop the requester (it flushes and closes the page store on SIGTERM)
  if [ -f "$pidfile" ]; then
    local pid; pid=$(cat "$pidfile")
    if kill -TERM "$pid" 2>/dev/null; then
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && { echo "requester.sh: requester $pid ignored SIGTERM, killing" >&2; kill -KILL "$pid"; }
    fi
    rm -f "$pidfile"
  fi
  echo "requester.sh: $dev is down"
}

case "$cmd" in
up) [ $# -ge 3 ] || usage; shift; up "$@" ;;
down) shift; down "$@" ;;
status)
  dev=${2:-/dev/nbd0}
  grep "^$dev " /proc/swaps 2>/dev/null || echo "$dev: not swap"
  if [ -b "$dev" ] && nbd_busy "$dev"; then echo "$dev: attached"; else echo "$dev: not attached"; fi
  ;;
*) usage ;;
esac
