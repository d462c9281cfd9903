"""Swap through the kernel's own NBD client: rram vs zram vs a disk, in the soft-RoCE guest.

    scripts/bench-vm.sh -k swap_vm           # boots the guest (with a scratch virtio disk)

The host has no kernel NBD client, so its swap figures go through FUSE; this guest has one.
The verifying workload (rram.testing.swapload, WORKING_SET_MIB in a cgroup limited to LIMIT)
runs once per device, one device active at a time, and its completion time is the figure:
  * zram: /dev/zram0 with lz4, in the guest kernel;
  * disk: /dev/vda, a raw scratch disk the host opens with O_DIRECT (no host page cache;
    scripts/rxe-vm/run attaches it when RXE_DISK_MB is set), swap on the whole device;
  * nbdkit: `nbdkit memory` (C, pages in local RAM) behind the same nbd-client -swap on
    /dev/nbd0: the floor of that kernel path, so that rram's own share of its time shows;
  * rram: scripts/requester.sh up (nbd-client -swap on /dev/nbd0) over two providers reached
    with verbs across the rxe pair, 2 MiB local budget (the fixture of tests/vm/test_nbd_swap).
Everything is emulated (TCG): ratios compare the paths' software costs, not hardware.
Results: printed and in $RRAM_BENCH_OUT/swap-bench.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from rram.testing.swapdevices import GUEST_DEVICES, Unavailable, guest_swap_device
from rram.testing.swapload import MemoryLimit, command
from tests.conftest import require_or_skip
from tests.vm.test_nbd_swap import DEV, stack  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

MiB = 1 << 20
WORKING_SET_MIB = 48
LIMIT = 16 * MiB
SWAP_SIZE = 128 * MiB
OUT_DIR = os.environ.get("RRAM_BENCH_OUT", "/tmp/rram-bench")
RESULTS: dict[str, dict] = {}


def _workload() -> dict:
    lim = MemoryLimit.make(LIMIT)
    require_or_skip(None if lim else f"no memory cgroup: {MemoryLimit.reason}")
    with lim:
        t0 = time.monotonic()
        proc = subprocess.run(command(WORKING_SET_MIB, passes=1, cgroup=lim.path), capture_output=True,
                              text=True, timeout=600)
        wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bad_pages"] == 0, summary
    summary["wall_seconds"] = round(wall, 3)
    return summary


def _record(device: str, summary: dict) -> None:
    RESULTS[device] = summary
    print(f"\nswap-vm {device}: {summary}")
    t = {k: v["seconds"] for k, v in RESULTS.items()}
    if {"zram", "rram"} <= t.keys():
        ratios = {"rram_over_zram": round(t["rram"] / t["zram"], 2)}
        if "disk" in t:
            ratios["disk_over_rram"] = round(t["disk"] / t["rram"], 2)
        if "nbdkit" in t:
            ratios["rram_over_nbdkit_same_path"] = round(t["rram"] / t["nbdkit"], 2)
        print(f"swap-vm {WORKING_SET_MIB} MiB in {LIMIT // MiB} MiB: seconds {t} {ratios} "
              "(goals: rram_over_zram <= 1.5, disk_over_rram >= 3)")
        os.makedirs(OUT_DIR, exist_ok=True)
        with open(os.path.join(OUT_DIR, "swap-bench.json"), "w") as f:
            json.dump({"seconds": t, "ratios": ratios, "runs": RESULTS}, f, indent=1)


@pytest.mark.parametrize("device", GUEST_DEVICES)
def test_kernel_side(device):
    """zram, the scratch disk, and nbdkit behind nbd-client -swap on /dev/nbd0."""
    try:
        with guest_swap_device(device, SWAP_SIZE):
            summary = _workload()
    except Unavailable as exc:
        require_or_skip(str(exc))
    _record(device, summary)


def test_rram(stack):  # noqa: F811
    try:
        stack.up()
        _record("rram", _workload())
    finally:
        down = stack.script("down", DEV)
    assert down.returncode == 0, down.stdout + down.stderr
