#!/usr/bin/env bash
# One guest of the multi-guest soft-RoCE cluster (tests/vmcluster/test_machine_lost.py).
#
#   guest.sh provider NAME ADDRESS CONFIG      eth0 gets ADDRESS; `rram provider` for NAME
#   guest.sh requester ADDRESS CONFIG JOB...   eth0..ethN-1 bridged as br0 with ADDRESS; runs JOB
#
# Every guest is its own kernel; the only wires between them are qemu socket netdevs over the
# host's loopback.  The requester's guest bridges one NIC per provider guest, so all guests
# share one link-local segment, and soft-RoCE runs on it as "rxenet" in each guest (GID index
# 0: the IPv6 link-local address, as in the single-guest lab).
set -euo pipefail
role=$1; shift
modprobe virtio_net
modprobe bridge 2>/dev/null || true

wait_rdma() {   # rxenet active with a GID at index 0: until then a QP cannot be connected
  local gid=/sys/class/infiniband/rxenet/ports/1/gids/0 i
  for i in $(seq 100); do
    if rdma link show rxenet/1 2>/dev/null | grep -q 'state ACTIVE' \
       && [ -r $gid ] && [ "$(cat $gid)" != "0000:0000:0000:0000:0000:0000:0000:0000" ]; then
      echo "guest: rxenet ready, GID $(cat $gid)"; return 0
    fi
    sleep 0.2
  done
  echo "guest: rxenet did not come up" >&2; rdma link show >&2; return 97
}

case $role in
  provider)
    name=$1 address=$2 config=$3
    ip link set eth0 up
    ip addr add "$address/24" dev eth0
    rdma link add rxenet type rxe netdev eth0
    wait_rdma
    exec python -m rram provider --config "$config" --name "$name"
    ;;
  requester)
    address=$1 config=$2; shift 2
    ip link add br0 type bridge
    for nic in /sys/class/net/eth*; do
      ip link set "$(basename "$nic")" master br0 up
    done
    ip link set br0 up
    ip addr add "$address/24" dev br0
    rdma link add rxenet type rxe netdev br0
    wait_rdma
    exec "$@"
    ;;
  *) echo "usage: $0 provider|requester ..." >&2; exit 2 ;;
esac
