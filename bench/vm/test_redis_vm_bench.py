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
import functools
import json
import os
import shutil
import statistics
import subprocess
import tempfile

import pytest

from rram.testing import redisload
from rram.testing.swapdevices import GUEST_DEVICES, Unavailable, cpu_seconds, guest_swap_device, process_role
from rram.testing.swapload import MemoryLimit, vmstat
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


@contextlib.contextmanager
def _kernel_side(name: str):
    """zram, the scratch disk or nbdkit behind nbd-client: the serving pids (none in-kernel)."""
    servers: list[int] = []
    try:
        with guest_swap_device(name, SWAP_SIZE, pin=_pin, servers=servers):
            yield servers
    except Unavailable as exc:
        require_or_skip(str(exc))


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


DEVICES = {**{name: functools.partial(_kernel_side, name) for name in GUEST_DEVICES},
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
            roles = {pid: process_role(pid) for pid in servers}
            swap0 = vmstat()["pswpin"]
            benchmark.pedantic(lambda: runs.append(redis.gets(KEYS, REQUESTS)), rounds=ROUNDS, iterations=1)
            used = {pid: cpu_seconds(pid) - cpu0[pid] for pid in servers}
            swapped = vmstat()["pswpin"] - swap0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_latency_ms", "p99_latency_ms")}
    info = {"ops_per_s": med["rps"], "p50_ms": med["p50_latency_ms"], "p99_ms": med["p99_latency_ms"],
            "server_cpu_us_per_get": round(sum(used.values()) / (ROUNDS * REQUESTS) * 1e6, 1),
            "cpu_us_per_get_by_process": {role: round(sum(v for pid, v in used.items() if roles[pid] == role)
                                                      / (ROUNDS * REQUESTS) * 1e6, 1) for role in sorted(set(roles.values()))},
            "pages_swapped_in": swapped,
            "rounds": runs}
    assert swapped > 0, f"nothing was swapped in on {device}: the cgroup limit did not bite"
    benchmark.extra_info.update(info)
    _record(device, info)
