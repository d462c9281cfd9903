#!/usr/bin/env bash
# Install everything rram needs on a fresh Debian/Ubuntu machine, build it, and run the
# embedded default (`rram demo`: two providers and a requester on loopback).
#
#   scripts/setup.sh            install + build + demo
#   scripts/setup.sh --no-demo  install + build only (CI)
#
# Idempotent: packages already present are not reinstalled, the venv is reused.
# RRAM_NO_VM=1 skips the packages only the soft-RoCE VM harness needs (qemu, kernel tools).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${RRAM_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
demo=1
for arg in "$@"; do
  case $arg in
    --no-demo) demo=0 ;;
    *) echo "usage: $0 [--no-demo]" >&2; exit 2 ;;
  esac
done

# Debian packages: build deps, rdma-core + perftest + pyverbs, real NBD clients for tests
# (libnbd-bin has nbdinfo, nbdcopy and nbdfuse: naming "nbdfuse", a virtual package, made every
# run look for a package that dpkg never reports installed),
# Redis (the real application bench/app drives: it starts its own instance on a unix socket).
PKGS="build-essential pkg-config liblz4-dev libssl-dev libgcrypt20-dev libibverbs-dev librdmacm-dev rdma-core ibverbs-providers
      ibverbs-utils perftest python3-pyverbs libnbd-bin nbdkit fuse3 qemu-utils fio iproute2 util-linux
      redis-server redis-tools"
VM_PKGS="qemu-system-x86 busybox-static kmod cpio bc nbd-client"
[ "${RRAM_NO_VM:-0}" = 1 ] || PKGS="$PKGS $VM_PKGS"

wait_dpkg_lock() {  # another apt (unattended upgrades, a parallel CI step) may hold it
  local i
  for i in $(seq 1 120); do
    if ! fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock >/dev/null 2>&1; then return 0; fi
    [ "$i" = 1 ] && echo "setup: waiting for the dpkg lock"
    sleep 2
  done
  echo "setup: dpkg lock still held after 240 s" >&2
  return 1
}

missing=$(for p in $PKGS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "setup: installing Debian packages:" $missing
  wait_dpkg_lock
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  wait_dpkg_lock
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=240 $missing
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating venv $VENV"
  $PY -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip "setuptools>=68" wheel "cython>=3.0"
"$VENV/bin/python" -m pip install -q -e ".[test,bench]"   # bench: scripts/bench-report.sh

# pyverbs (for tools and interop tests): Debian's build for the system rdma-core, made
# importable in the venv; same CPython 3.11 ABI.  pyverbs ships no .pxd, ext/ declares its own.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/pyverbs ] && [ ! -e "$SITE/pyverbs" ]; then
  ln -sfn /usr/lib/python3/dist-packages/pyverbs "$SITE/pyverbs"
fi
"$VENV/bin/python" -c 'import pyverbs.device' 2>/dev/null && echo "setup: pyverbs importable" \
  || echo "setup: pyverbs not importable in the venv (interop tests will skip)"

# Build the extensions in place too, so that tests run against the tree.
"$VENV/bin/python" setup.py -q build_ext --inplace
"$VENV/bin/python" -c 'import rram; rram.print_build_info()'

if [ $demo = 1 ]; then
  exec "$VENV/bin/rram" demo
fi
