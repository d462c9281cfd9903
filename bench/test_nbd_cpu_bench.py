"""Server CPU per NBD request: single 4 KiB READs and WRITEs at queue depth 1, rram vs nbdkit.

    .venv/bin/pytest bench/test_nbd_cpu_bench.py -p no:cacheprovider -s --benchmark-only

The kernel's swap I/O is mostly single 4 KiB requests, so what one request costs the server
process decides how much CPU swapping onto rram takes from the machine.  Measured per process:
utime + stime of the server (``/proc/<pid>/stat``) across one fio run, divided by the requests
fio completed.  rram: `rram requester` on two tcp provider processes with a 4 MiB local budget
(nearly every page remote; the providers' CPU is not counted: they are other machines in a
deployment), and the same with ``--no-nbd-c-path`` (every request on the Python path: what the C
path saves).  Baseline in the same run: `nbdkit memory`.  fio's nbd engine at iodepth 1, pinned
as in test_nbd_fio_bench.py.  Clock ticks are 10 ms, so a run needs tens of thousands of requests
for the figure to mean anything; the IOPS figure is wall-clock and noisy on a shared machine.
"""
from __future__ import annotations

import os

import pytest

from test_nbd_fio_bench import _fio, _serve  # the same servers and fio invocation

RUNTIME = 5
_TICK = os.sysconf("SC_CLK_TCK")
_cpu: dict[tuple[str, str], float] = {}
_iops: dict[tuple[str, str], float] = {}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


@pytest.fixture(scope="module", params=["nbdkit", "rram", "rram-py"])
def server(request):
    yield from _serve(request.param)


@pytest.mark.parametrize("rw", ["randread", "randwrite"])
def test_cpu_per_request(benchmark, server, rw):
    kind, uri, pid = server
    args = [f"--rw={rw}", "--iodepth=1", "--time_based", f"--runtime={RUNTIME}", "--randrepeat=1",
            "--norandommap", "--buffer_compress_percentage=50", "--refill_buffers"]
    before = _cpu_seconds(pid)
    job = benchmark.pedantic(_fio, args=(uri, *args), rounds=1, iterations=1)
    used = _cpu_seconds(pid) - before
    side = job["read" if rw == "randread" else "write"]
    ios = side["total_ios"]
    us = used / max(1, ios) * 1e6
    _cpu[(kind, rw)] = us
    benchmark.extra_info.update(server=kind, rw=rw, requests=ios, iops=round(side["iops"]),
                                cpu_us_per_request=round(us, 1))
    line = f"{kind:7} {rw:9} qd1 {side['iops']:8.0f} IOPS  {us:6.1f} us CPU/request ({ios} requests)"
    base = _cpu.get(("nbdkit", rw))
    _iops[(kind, rw)] = side["iops"]
    if kind.startswith("rram") and base:
        ratio = side["iops"] / _iops[("nbdkit", rw)]
        benchmark.extra_info.update(rram_over_nbdkit_cpu=round(us / base, 2), rram_over_nbdkit_iops=round(ratio, 2))
        line += f"  /nbdkit: CPU {us / base:.2f}x, IOPS {ratio:.2f}x"
    print("\n" + line)
