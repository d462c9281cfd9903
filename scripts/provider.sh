#!/usr/bin/env bash
# Donate this node's memory: run `rram provider` for NODE of the cluster file, in the background.
#
#   scripts/provider.sh start CONFIG NODE     wait for "rram provider NODE ready", write a pid file
#   scripts/provider.sh stop  [NODE]          SIGTERM, then SIGKILL after 10 s
#   scripts/provider.sh status CONFIG         ask every provider for its counters (rram status)
#
# Stop providers last: requesters (swapoff, nbd-client -d, requester down) first, or the pages
# they hold there are gone (with replicas: 1).  Logs and pid files: $RRAM_RUN (/run/rram).
set -euo pipefail
RUN=${RRAM_RUN:-/run/rram}
RRAM=${RRAM:-"python3 -m rram"}
cmd=${1:-}
usage() { echo "usage: $0 start CONFIG NODE | stop [NODE] | status CONFIG" >&2; exit 2; }

case "$cmd" in
start)
  config=${2:-}; node=${3:-}
  [ -n "$config" ] && [ -n "$node" ] || usage
  [ -r "$config" ] || { echo "provider.sh: cannot read cluster file $config" >&2; exit 2; }
  mkdir -p "$RUN"
  pidfile="$RUN/provider-$node.pid"; out="$RUN/provider-$node.out"; log="$RUN/provider-$node.log"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "provider.sh: provider $node already runs (pid $(cat "$pidfile"))"; exit 0
  fi
  : >"$out"
  # shellcheck disable=SC2086  # $RRAM may be "python3 -m rram"
  nohup $RRAM -v provider --config "$config" --name "$node" >"$out" 2>>"$log" </dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 200); do
    grep -q "^rram provider $node ready " "$out" && { cat "$out"; exit 0; }
    kill -0 "$(cat "$pidfile")" 2>/dev/null || break
    sleep 0.1
  done
  echo "provider.sh: provider $node did not become ready; last log lines:" >&2
  tail -n 20 "$log" >&2
  exit 1
  ;;
stop)
  node=${2:-*}
  shopt -s nullglob
  for pidfile in "$RUN"/provider-$node.pid; do
    pid=$(cat "$pidfile")
    if kill -TERM "$pid" 2>/dev/null; then
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && { echo "provider.sh: pid $pid ignored SIGTERM, killing" >&2; kill -KILL "$pid"; }
    fi
    rm -f "$pidfile"
    echo "provider.sh: stopped $(basename "$pidfile" .pid)"
  done
  ;;
status)
  [ -n "${2:-}" ] || usage
  # shellcheck disable=SC2086
  exec $RRAM status --config "$2"
  ;;
*) usage ;;
esac
