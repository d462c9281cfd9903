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
import shutil
import subprocess
import tempfile
import time

import pytest

from rram.testing.swapdevices import SCRATCH_DISK, scratch_disk_reason
from rram.testing.swapload import MemoryLimit, command, sh, stop_process, swaps, wait_for_path
from tests.conftest import require_or_skip
from tests.vm.test_nbd_swap import DEV, _nbd_reason, stack  # noqa: F401  (the fixture)

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


def _swap_on(dev: str):
    sh("mkswap", dev)
    sh("swapon", "-p", "100", dev)
    assert dev in swaps()


def test_zram():
    require_or_skip(None if os.geteuid() == 0 else "needs root")
    subprocess.run(["modprobe", "zram", "num_devices=1"], capture_output=True)
    if not os.path.exists("/sys/block/zram0"):
        pytest.skip("no zram module in this kernel")
    with open("/sys/block/zram0/comp_algorithm", "w") as f:
        f.write("lz4")
    with open("/sys/block/zram0/disksize", "w") as f:
        f.write(str(SWAP_SIZE))
    try:
        _swap_on("/dev/zram0")
        _record("zram", _workload())
    finally:
        sh("swapoff", "/dev/zram0", check=False, timeout=300)
        with open("/sys/block/zram0/reset", "w") as f:
            f.write("1")


def test_disk():
    subprocess.run(["modprobe", "virtio_blk"], capture_output=True)  # no udev in the guest to load it
    require_or_skip(scratch_disk_reason())
    try:
        _swap_on(SCRATCH_DISK)
        _record("disk", _workload())
    finally:
        sh("swapoff", SCRATCH_DISK, check=False, timeout=300)


def test_nbdkit():
    require_or_skip(_nbd_reason())
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    tmp = tempfile.mkdtemp(prefix="rram-swap-nbdkit-")
    sock = os.path.join(tmp, "nbdkit.sock")
    server = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", str(SWAP_SIZE)], stdin=subprocess.DEVNULL)
    attached = False
    try:
        wait_for_path(sock, server)
        sh("nbd-client", "-unix", sock, DEV, "-b", "4096", "-swap", timeout=30)
        attached = True
        _swap_on(DEV)
        _record("nbdkit", _workload())
    finally:
        if DEV in swaps():
            sh("swapoff", DEV, check=False, timeout=300)
        if attached:  # pages of a device still in use must not lose their server
            sh("nbd-client", "-d", DEV, check=False, timeout=30)
        if not attached or DEV not in swaps():
            stop_process(server)
        shutil.rmtree(tmp, ignore_errors=True)


def test_rram(stack):  # noqa: F811
    try:
        stack.up()
        _record("rram", _workload())
    finally:
        down = stack.script("down", DEV)
    assert down.returncode == 0, down.stdout + down.stderr
