"""A real application swapping: Redis GETs with its dataset twice the memory it may use.

    .venv/bin/pytest bench/app -p no:cacheprovider -s --benchmark-only     (root; redis-server)

Redis (Debian's redis-server, not ours; driven by rram.testing.redisload) holds KEYS values of 4 KiB, each about 2:1
compressible like real data (half random bytes, half a repeated tag), in a memory cgroup
capped at about half of its resident size, so the kernel swaps Redis itself.  Its own load
generator, redis-benchmark, then sends GETs over random keys (-r), one connection per client
(-c CLIENTS), no pipelining: most GETs touch a page that is out.  Swap devices, one at a time
(rram.testing.swapdevices): zram, a swap file on disk, `nbdkit memory` and rram, the two NBD
servers behind the same nbdfuse + loop path (this host has no kernel NBD client).

The timed value is the figure: the seconds redis-benchmark takes for REQUESTS GETs, three
rounds on one loaded dataset (median of 3); ops/s, p50 and p99 (redis-benchmark's own) and
the CPU the user-space serving processes spent per GET (utime+stime from /proc; in all and
per process kind: nbdfuse, nbdkit, requester, providers) go to extra_info.  Pinning: Redis and
redis-benchmark on CPU 0, every serving process on CPU 1.  ``RRAM_BENCH_NBD_SPIN_US=0`` runs
rram's NBD server with ``--nbd-spin-us 0`` (sleeping in recv between requests as nbdkit does),
``RRAM_BENCH_NBD_SPIN_FIXED=1`` with ``--nbd-spin-fixed`` (polling 50 us before every wait,
which takes CPU 1 from nbdfuse and the providers); by default its spin is adaptive.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile

import pytest

from rram.testing import redisload
from rram.testing import swapdevices as D
from rram.testing.swapload import MemoryLimit, vmstat

QUICK = os.environ.get("RRAM_BENCH_QUICK") == "1"   # only proves it runs: figures mean nothing
KEYS = 8192 if QUICK else 65536  # 256 MiB of values; Redis' resident size ~330 MiB
LIMIT = (20 if QUICK else 160) << 20   # about half of it
SWAP_SIZE = 512 << 20
REQUESTS = 3000 if QUICK else 40000
APP_CPU, SERVER_CPU = "0", "1"
NBD_SPIN_US = os.environ.get("RRAM_BENCH_NBD_SPIN_US")  # None: the requester's default
NBD_SPIN_FIXED = os.environ.get("RRAM_BENCH_NBD_SPIN_FIXED") == "1"  # poll every wait, hit or miss
_results: dict[str, dict] = {}


def _pin(pid: int) -> None:
    if (os.cpu_count() or 1) > 1:
        subprocess.run(["taskset", "-a", "-c", "-p", SERVER_CPU, str(pid)], capture_output=True)


def _reason() -> str | None:
    return redisload.reason() or D.reason()


@pytest.mark.parametrize("device", D.DEVICES)
def test_redis_gets_with_swap_on(benchmark, device):
    reason = _reason()
    if reason:
        pytest.skip(reason)
    limit = MemoryLimit.make(LIMIT, name="rram-redis")
    if limit is None:
        pytest.skip(f"no memory cgroup: {MemoryLimit.reason}")
    workdir = tempfile.mkdtemp(prefix="rram-redis-")
    servers: list[int] = []
    runs: list[dict] = []
    try:
        spin = () if NBD_SPIN_US is None else ("--nbd-spin-us", NBD_SPIN_US)
        spin += ("--nbd-spin-fixed",) if NBD_SPIN_FIXED else ()
        with limit, D.swap_device(device, SWAP_SIZE, pin=_pin, servers=servers, requester_args=spin):
            with redisload.Redis(workdir, limit.path, cpu=APP_CPU) as redis:
                redis.load(KEYS)
                cpu0 = {pid: D.cpu_seconds(pid) for pid in servers}
                roles = {pid: D.process_role(pid) for pid in servers}
                swap0 = vmstat()

                def one_round():
                    runs.append(redis.gets(KEYS, REQUESTS))

                benchmark.pedantic(one_round, rounds=3, iterations=1)
                used = {pid: D.cpu_seconds(pid) - cpu0[pid] for pid in servers}
                cpu = sum(used.values())
                per_role: dict[str, float] = {}
                for pid, seconds in used.items():
                    per_role[roles[pid]] = per_role.get(roles[pid], 0.0) + seconds
                swap = {k: v - swap0[k] for k, v in vmstat().items() if k in ("pswpin", "pswpout")}
    except D.Unavailable as exc:
        pytest.skip(str(exc))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_latency_ms", "p99_latency_ms")}
    info = {"ops_per_s": med["rps"], "p50_ms": med["p50_latency_ms"], "p99_ms": med["p99_latency_ms"],
            "server_cpu_us_per_get": round(cpu / (3 * REQUESTS) * 1e6, 1),
            "cpu_us_per_get_by_process": {k: round(v / (3 * REQUESTS) * 1e6, 1) for k, v in sorted(per_role.items())},
            "rounds": runs,
            "swapped_pages": swap}
    benchmark.extra_info.update(info)
    _results[device] = info
    print(f"\nredis GET with swap on {device}: {med['rps']:.0f} ops/s, p50 {med['p50_latency_ms']} ms, "
          f"p99 {med['p99_latency_ms']} ms, serving CPU {info['server_cpu_us_per_get']} us/GET "
          f"({info['cpu_us_per_get_by_process']})")
    if device == "rram" and "nbdkit" in _results:
        ratio = round(_results["rram"]["ops_per_s"] / _results["nbdkit"]["ops_per_s"], 2)
        benchmark.extra_info["rram_over_nbdkit_ops"] = ratio
        print(f"rram / nbdkit on the same path: {ratio}x ops/s (goal >= 1.0)")
