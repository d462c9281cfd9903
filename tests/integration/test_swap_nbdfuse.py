"""Real swap on rram on a host without kernel NBD: requester -> nbdfuse -> loop -> swapon.

Two tcp providers (LocalCluster) and `rram requester` (2 MiB local budget, so pages go remote)
serve a 128 MiB export; nbdfuse shows it as a file, a loop device makes it a block device,
and it becomes swap.  The workload (rram.testing.swapload) touches 64 MiB in a child cgroup
limited to 24 MiB, so the kernel swaps that process alone while the requester runs outside
the limit; it checks every page of every pass.  Providers' counters prove the pages travelled.

Teardown is swapoff -> loop detach -> fuse unmount -> requester -> providers, each step in a
finally; a failed swapoff leaves the server running rather than strand swapped pages.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from rram import transport
from rram.testing.cluster import LocalCluster
from rram.testing.swapload import FuseLoopSwap, MemoryLimit, command, start_requester, stop_process, swaps
from tests.conftest import require_or_skip

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MiB = 1 << 20
EXPORT = 128 * MiB
WORKING_SET_MIB = 64
LIMIT = 24 * MiB


def _host_reason() -> str | None:
    if os.geteuid() != 0:
        return "swap on nbdfuse needs root (losetup, mkswap, swapon)"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"{dev} is missing"
    for tool in ("nbdfuse", "losetup", "mkswap", "swapon", "swapoff", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: nbdfuse, util-linux, fuse3)"
    return transport.unavailable_reason("tcp")


def provider_stats(cluster) -> list[dict]:
    return list(cluster.provider_stats("swap-test-observer").values())


@pytest.fixture
def limit():
    lim = MemoryLimit.make(LIMIT)
    if lim is None:
        pytest.skip(f"no memory limit for the workload: {MemoryLimit.reason}")
    with lim:
        yield lim


def test_swap_on_rram_through_nbdfuse(limit):
    require_or_skip(_host_reason())
    tmp = tempfile.mkdtemp(prefix="rram-swap-")
    requester = swap = dev = None
    try:
        with LocalCluster(n_providers=2, capacity="128MiB", transport="tcp", workdir=tmp, slab_size="1MiB",
                          verbose=False, requester={"local_budget": "2MiB"}) as cluster:
            sock = os.path.join(tmp, "nbd.sock")
            try:
                requester, _ = start_requester(cluster.config_path, "req", EXPORT, sock,
                                               os.path.join(tmp, "requester.log"))
                swap = FuseLoopSwap(["--unix", sock], tmp, priority=32000)
                dev = swap.loop
                assert dev in swaps()
                proc = subprocess.run(command(WORKING_SET_MIB, passes=2, cgroup=limit.path), capture_output=True,
                                      text=True, timeout=180)
                assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
                summary = json.loads(proc.stdout.strip().splitlines()[-1])
                assert summary["bad_pages"] == 0
                # the limit forced this process out to swap and back: at least the excess, each way
                excess = (WORKING_SET_MIB * MiB - LIMIT) // 4096
                assert summary["pswpout"] >= excess and summary["pswpin"] >= excess // 2, summary
                stats = provider_stats(cluster)
                assert sum(s["used"] for s in stats) > 0, stats
                assert sum(s["bytes_written"] for s in stats) >= 4 * MiB, stats
                assert sum(s["bytes_read"] for s in stats) > 0, stats
            finally:
                errors = swap.close() if swap is not None else []
                if swap is None or not swap.active:  # never stop the server under live swap
                    assert stop_process(requester) in (0, None), "requester did not exit cleanly"
                assert not errors, errors
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert dev is None or dev not in swaps()
