"""A real application swapping through the kernel's own NBD client, in the soft-RoCE guest.

    scripts/bench-vm.sh -k redis          # boots the guest (with a scratch virtio disk)

The guest's counterpart of bench/app (whose host has no kernel NBD client, so its NBD servers
sit behind nbdfuse + loop): Redis (rram.testing.redisload) holds KEYS values of 4 KiB, about
2:1 compressible, in a memory cgroup capped at about half its resident size, and
redis-benchmark sends GETs over random keys.  Swap devices, one at a time:
  * zram (lz4, in the guest kernel) and disk (/dev/vda, a raw scratch disk the host opens with
    O_DIRECT): the in-kernel alternatives;
  * nbdkit: `nbdkit memory` behind nbd-client -swap on /dev/nbd0, the floor of that path;
  * rram-verbs and rram-tcp: scripts/requester.sh up (nbd-client -swap on /dev/nbd0) over two
    providers, 2 MiB local budget, reached with verbs across the rxe pair and with tcp, so
    that soft-RoCE's own share of the time shows.
The timed value is the figure: the seconds redis-benchmark takes for REQUESTS GETs, three
rounds on one loaded dataset (median of 3); ops/s, p50, p99 and the CPU each user-space
serving process spent per GET (/proc) go to extra_info.  Pinning: Redis and redis-benchmark on
vCPU 0, every serving process on vCPU 1.  Everything is emulated (TCG): only ratios in one run
mean anything.  Results: printed and in $RRAM_BENCH_OUT/redis-bench.json.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile

import pytest

from rram.testing import redisload
from rram.testing.swapdevices import SCRATCH_DISK, cpu_seconds, scratch_disk_reason
from rram.testing.swapload import MemoryLimit, sh, stop_process, swaps, vmstat, wait_for_path
from rram.transport import verbs
from tests.conftest import require_or_skip
from tests.vm.test_nbd_swap import DEV, _nbd_reason, swap_stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

MiB = 1 << 20
KEYS = 16384             # 64 MiB of values; Redis' resident size ~85 MiB
LIMIT = 40 * MiB         # about half of it
SWAP_SIZE = 128 * MiB
REQUESTS = 4000
ROUNDS = 3
APP_CPU, SERVER_CPU = "0", "1"
OUT_DIR = os.environ.get("RRAM_BENCH_OUT", "/tmp/rram-bench")
RESULTS: dict[str, dict] = {}


def _pin(pid: int) -> None:
    if (os.cpu_count() or 1) > 1:
        subprocess.run(["taskset", "-a", "-c", "-p", SERVER_CPU, str(pid)], capture_output=True)


def _swap_on(dev: str) -> None:
    sh("mkswap", dev)
    sh("swapon", "-p", "100", dev)
    assert dev in swaps()


@contextlib.contextmanager
def _zram():
    subprocess.run(["modprobe", "zram", "num_devices=1"], capture_output=True)
    if not os.path.exists("/sys/block/zram0"):
        pytest.skip("no zram module in this kernel")
    with open("/sys/block/zram0/comp_algorithm", "w") as f:
        f.write("lz4")
    with open("/sys/block/zram0/disksize", "w") as f:
        f.write(str(SWAP_SIZE))
    try:
        _swap_on("/dev/zram0")
        yield []
    finally:
        sh("swapoff", "/dev/zram0", check=False, timeout=300)
        with open("/sys/block/zram0/reset", "w") as f:
            f.write("1")


@contextlib.contextmanager
def _disk():
    subprocess.run(["modprobe", "virtio_blk"], capture_output=True)  # no udev in the guest to load it
    require_or_skip(scratch_disk_reason())
    try:
        _swap_on(SCRATCH_DISK)
        yield []
    finally:
        sh("swapoff", SCRATCH_DISK, check=False, timeout=300)


@contextlib.contextmanager
def _nbdkit():
    require_or_skip(_nbd_reason())
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    tmp = tempfile.mkdtemp(prefix="rram-redis-nbdkit-")
    sock = os.path.join(tmp, "nbdkit.sock")
    server = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", str(SWAP_SIZE)], stdin=subprocess.DEVNULL)
    attached = False
    try:
        wait_for_path(sock, server)
        _pin(server.pid)
        sh("nbd-client", "-unix", sock, DEV, "-b", "4096", "-swap", timeout=30)
        attached = True
        _swap_on(DEV)
        yield [server.pid]
    finally:
        if DEV in swaps():
            sh("swapoff", DEV, check=False, timeout=300)
        if attached:  # pages of a device still in use must not lose their server
            sh("nbd-client", "-d", DEV, check=False, timeout=30)
        if not attached or DEV not in swaps():
            stop_process(server)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _rram(transport: str):
    require_or_skip(_nbd_reason())
    if transport == "verbs":
        require_or_skip(verbs.unavailable_reason())
    with swap_stack(transport) as stack:
        try:
            stack.up()
            servers = [stack.requester_pid(), *(p.pid for p in stack.cluster.procs.values())]
            for pid in servers:
                _pin(pid)
            yield servers
        finally:
            down = stack.script("down", DEV)
            assert down.returncode == 0, down.stdout + down.stderr


DEVICES = {"zram": _zram, "disk": _disk, "nbdkit": _nbdkit,
           "rram-verbs": lambda: _rram("verbs"), "rram-tcp": lambda: _rram("tcp")}


def _record(device: str, info: dict) -> None:
    RESULTS[device] = info
    ops = {k: v["ops_per_s"] for k, v in RESULTS.items()}
    ratios = {f"{k}_over_nbdkit": round(ops[k] / ops["nbdkit"], 2)
              for k in ("rram-verbs", "rram-tcp") if k in ops and "nbdkit" in ops}
    print(f"\nredis-vm GET with swap on {device}: {info}\nops/s {ops} {ratios} (goal: rram >= 1.0x nbdkit)")
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "redis-bench.json"), "w") as f:
        json.dump({"ops_per_s": ops, "ratios": ratios, "runs": RESULTS}, f, indent=1)


@pytest.mark.parametrize("device", list(DEVICES))
def test_redis_gets_with_swap_on(benchmark, device):
    require_or_skip(None if os.geteuid() == 0 else "needs root")
    require_or_skip(redisload.reason())
    limit = MemoryLimit.make(LIMIT, name="rram-redis-vm")
    require_or_skip(None if limit else f"no memory cgroup: {MemoryLimit.reason}")
    workdir = tempfile.mkdtemp(prefix="rram-redis-vm-")
    runs: list[dict] = []
    try:
        with limit, DEVICES[device]() as servers, redisload.Redis(workdir, limit.path, cpu=APP_CPU) as redis:
            redis.load(KEYS)
            cpu0 = {pid: cpu_seconds(pid) for pid in servers}
            swap0 = vmstat()["pswpin"]
            benchmark.pedantic(lambda: runs.append(redis.gets(KEYS, REQUESTS)), rounds=ROUNDS, iterations=1)
            cpu = sum(cpu_seconds(pid) - cpu0[pid] for pid in servers)
            swapped = vmstat()["pswpin"] - swap0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_latency_ms", "p99_latency_ms")}
    info = {"ops_per_s": med["rps"], "p50_ms": med["p50_latency_ms"], "p99_ms": med["p99_latency_ms"],
            "server_cpu_us_per_get": round(cpu / (ROUNDS * REQUESTS) * 1e6, 1), "pages_swapped_in": swapped,
            "rounds": runs}
    assert swapped > 0, f"nothing was swapped in on {device}: the cgroup limit did not bite"
    benchmark.extra_info.update(info)
    _record(device, info)
