#!/usr/bin/env bash
# Soft-RoCE on a real host whose kernel has rdma_rxe: add an rxe device on an Ethernet
# interface so the verbs transport (and tests/vm) can run without RDMA hardware.
#
#   sudo scripts/rxe-setup.sh IFACE [NAME]     e.g. scripts/rxe-setup.sh eth0  (NAME: rxe0)
#
# Idempotent: an existing rxe device on IFACE is kept.  Kernels without rdma_rxe (or without
# loadable modules) cannot do this: use scripts/rxe-vm/run, which boots one under qemu.
set -euo pipefail
IFACE=${1:?usage: $0 IFACE [NAME]}
NAME=${2:-rxe0}
command -v rdma >/dev/null || { echo "rxe-setup: the 'rdma' tool is missing (apt-get install iproute2)" >&2; exit 2; }
ip link show "$IFACE" >/dev/null 2>&1 || { echo "rxe-setup: no interface $IFACE" >&2; exit 2; }
if ! modprobe rdma_rxe 2>/dev/null && [ ! -d /sys/module/rdma_rxe ]; then
  echo "rxe-setup: this kernel has no rdma_rxe module (try scripts/rxe-vm/run)" >&2
  exit 2
fi
modprobe ib_uverbs 2>/dev/null || true
existing=$(rdma link show 2>/dev/null | awk -v i="$IFACE" '$0 ~ "netdev "i"( |$)" {sub("/.*", "", $2); print $2; exit}')
if [ -n "$existing" ]; then
  echo "rxe-setup: $IFACE already carries $existing"
else
  rdma link add "$NAME" type rxe netdev "$IFACE"
  echo "rxe-setup: added $NAME on $IFACE"
fi
rdma link show
command -v ibv_devices >/dev/null && ibv_devices || echo "rxe-setup: ibv_devices not installed (apt-get install ibverbs-utils)"
