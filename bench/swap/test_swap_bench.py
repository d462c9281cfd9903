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

import contextlib
import json
import os
import shutil
import subprocess
import tempfile

import pytest

from figures import scaled
from rram.testing.cluster import LocalCluster
from rram.testing.swapload import (
    FuseLoopSwap,
    MemoryLimit,
    command,
    sh,
    start_requester,
    stop_process,
    swaps,
    wait_for_path,
)

WORKING_SET_MIB = scaled(128, 32)
PASSES = scaled(2, 1)
LIMIT = WORKING_SET_MIB // 2 << 20
SWAP_SIZE = 256 << 20
WORKLOAD_CPU, SERVER_CPU = "0", "1"
_results: dict[str, dict] = {}


def _reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if swaps():
        return f"another swap is active ({swaps()}): results would mix devices"
    return None


def _pin(pid: int) -> None:
    if os.cpu_count() and os.cpu_count() > 1:
        subprocess.run(["taskset", "-a", "-c", "-p", SERVER_CPU, str(pid)], capture_output=True)


def _zram():
    dev = "/dev/zram0"
    try:
        with open("/sys/block/zram0/disksize") as f:
            in_use = f.read().strip() != "0"
    except OSError:
        in_use = True
    if not os.path.exists(dev) or in_use:
        pytest.skip("/dev/zram0 is missing or in use")
    try:
        with open("/sys/block/zram0/comp_algorithm", "w") as f:
            f.write("lz4")
    except OSError:
        pass  # keep the default algorithm
    with open("/sys/block/zram0/disksize", "w") as f:
        f.write(str(SWAP_SIZE))
    try:
        sh("mkswap", dev)
        sh("swapon", dev)
        yield dev
    finally:
        sh("swapoff", dev, check=False, timeout=300)
        with open("/sys/block/zram0/reset", "w") as f:
            f.write("1")


def _disk():
    tmp = tempfile.mkdtemp(prefix="rram-swapfile-", dir="/var/tmp")
    path = os.path.join(tmp, "swapfile")
    try:
        sh("dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={SWAP_SIZE >> 20}", "status=none")
        os.chmod(path, 0o600)
        sh("mkswap", path)
        if sh("swapon", path, check=False).returncode:
            pytest.skip(f"the file system under {tmp} cannot hold a swap file")
        yield path
    finally:
        if path in swaps():
            sh("swapoff", path, timeout=300)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _fuse_swap(sock: str, tmp: str, server: subprocess.Popen):
    """Swap on the NBD server at ``sock`` through nbdfuse and a loop device; stops ``server``
    afterwards unless the device could not stop being swap (its pages would be lost)."""
    swap = None
    try:
        swap = FuseLoopSwap(["--unix", sock], tmp)
        _pin(swap._fuse.pid)
        yield swap.loop
    finally:
        errors = swap.close() if swap is not None else []
        if swap is None or not swap.active:
            stop_process(server)
        assert not errors, errors


def _rram():
    tmp = tempfile.mkdtemp(prefix="rram-swap-")
    try:
        with LocalCluster(n_providers=2, capacity="256MiB", transport="tcp", workdir=tmp, slab_size="4MiB",
                          verbose=False, requester={"local_budget": "4MiB"}) as cluster:
            for proc in cluster.procs.values():
                _pin(proc.pid)
            sock = os.path.join(tmp, "nbd.sock")
            requester, _ = start_requester(cluster.config_path, "req", SWAP_SIZE, sock,
                                           os.path.join(tmp, "requester.log"))
            _pin(requester.pid)
            with _fuse_swap(sock, tmp, requester) as loop:
                yield loop
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _nbdkit():
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    tmp = tempfile.mkdtemp(prefix="rram-swap-nbdkit-")
    sock = os.path.join(tmp, "nbdkit.sock")
    server = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", str(SWAP_SIZE)], stdin=subprocess.DEVNULL)
    try:
        try:
            wait_for_path(sock, server)
        except BaseException:
            stop_process(server)
            raise
        _pin(server.pid)
        with _fuse_swap(sock, tmp, server) as loop:
            yield loop
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("device", ["zram", "disk", "nbdkit", "rram"])
def test_swap_bound_workload(benchmark, device):
    reason = _reason()
    if reason:
        pytest.skip(reason)
    limit = MemoryLimit.make(LIMIT)
    if limit is None:
        pytest.skip(f"no memory cgroup: {MemoryLimit.reason}")
    setup = {"zram": _zram, "disk": _disk, "nbdkit": _nbdkit, "rram": _rram}[device]()
    try:
        with limit:
            next(setup)
            argv = ["taskset", "-c", WORKLOAD_CPU] + command(WORKING_SET_MIB, PASSES, cgroup=limit.path)

            def run():
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
                assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
                return json.loads(proc.stdout.strip().splitlines()[-1])

            summary = benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        setup.close()
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
