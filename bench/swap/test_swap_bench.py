"""A swap-bound workload with swap on rram vs zram vs a swap file on disk (host).

    .venv/bin/pytest bench/swap -p no:cacheprovider -s      (root; cgroup memory, /dev/fuse, loop)

The workload (rram.testing.swapload) touches WORKING_SET MiB over PASSES passes in a child
cgroup limited to half of it, checking every page; the figure is its completion time.
Devices, one at a time (swap is machine-wide; the only one active gets every page):
* rram: two tcp providers + `rram requester` (4 MiB local budget) -> nbdfuse -> loop -> swap
* zram: /dev/zram0, lz4, in-kernel compressed RAM (the goal: rram <= 1.5x its time)
* disk: a swap file on the root file system (the goal: rram >= 3x faster)
* nbdkit: `nbdkit memory` (C, local RAM) -> nbdfuse -> loop -> swap: the floor of the FUSE
  path itself, so that rram's own share of its time is visible
Pinning: the workload runs on CPU 0; rram's user-space servers (providers, requester, nbdfuse)
on CPU 1.  zram and disk do their work in the workload's context or the kernel's.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from figures import scaled
from rram.testing import swapdevices as D
from rram.testing.swapload import MemoryLimit, command

WORKING_SET_MIB = scaled(128, 32)
PASSES = scaled(2, 1)
LIMIT = WORKING_SET_MIB // 2 << 20
SWAP_SIZE = 256 << 20
WORKLOAD_CPU, SERVER_CPU = "0", "1"
_results: dict[str, dict] = {}


def _pin(pid: int) -> None:
    if os.cpu_count() and os.cpu_count() > 1:
        subprocess.run(["taskset", "-a", "-c", "-p", SERVER_CPU, str(pid)], capture_output=True)


@pytest.mark.parametrize("device", D.DEVICES)
def test_swap_bound_workload(benchmark, device):
    reason = D.reason()
    if reason:
        pytest.skip(reason)
    limit = MemoryLimit.make(LIMIT)
    if limit is None:
        pytest.skip(f"no memory cgroup: {MemoryLimit.reason}")
    try:
        with limit, D.swap_device(device, SWAP_SIZE, pin=_pin):
            argv = ["taskset", "-c", WORKLOAD_CPU] + command(WORKING_SET_MIB, PASSES, cgroup=limit.path)

            def run():
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
                assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
                return json.loads(proc.stdout.strip().splitlines()[-1])

            summary = benchmark.pedantic(run, rounds=1, iterations=1)
    except D.Unavailable as exc:
        pytest.skip(str(exc))
    assert summary["bad_pages"] == 0
    _results[device] = summary
    benchmark.extra_info.update(summary)
    print(f"\n{device}: {summary}")
    if device == "rram" and {"zram", "disk"} <= _results.keys():
        t = {k: v["seconds"] for k, v in _results.items()}
        ratios = {"rram_over_zram": round(t["rram"] / t["zram"], 2), "disk_over_rram": round(t["disk"] / t["rram"], 2)}
        if "nbdkit" in t:
            ratios["rram_over_nbdkit_same_path"] = round(t["rram"] / t["nbdkit"], 2)
        benchmark.extra_info.update(ratios)
        print(f"swap-bound {WORKING_SET_MIB} MiB in {LIMIT >> 20} MiB, {PASSES} passes: seconds {t} {ratios} "
              f"(goals: rram_over_zram <= 1.5, disk_over_rram >= 3)")
