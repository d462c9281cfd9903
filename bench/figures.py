"""What the benchmark suites share: the quick mode, and figures that are not durations.

``RRAM_BENCH_QUICK=1`` (``bench/report.py --quick``) shrinks sizes and rounds so that a suite
only proves it runs; its figures mean nothing.

pytest-benchmark times a function.  Some figures are not the duration of one call (bytes of
metadata a page, microseconds per fio I/O): ``FigureClock`` is a timer that moves only by the
figures added to it, so that the median and every statistic pytest-benchmark records (and
``--benchmark-json`` writes) are of the figure itself.  bench/conftest.py's ``figure`` fixture
wires it in.
"""
from __future__ import annotations

import contextlib
import os

QUICK = os.environ.get("RRAM_BENCH_QUICK") == "1"


def scaled(full: int, quick: int) -> int:
    """``full`` normally, ``quick`` under RRAM_BENCH_QUICK=1."""
    return quick if QUICK else full


class FigureClock:
    """A pytest-benchmark timer whose reading moves only by the figures added to it."""

    def __init__(self, unit: str):
        self.unit = unit
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def __repr__(self) -> str:  # pytest-benchmark writes the timer's name into its JSON
        return f"FigureClock({self.unit})"


def bench_cpus(role: str):
    """The CPUs a benchmark pins ``role`` ("requester" or "provider") to, from RRAM_BENCH_PIN:
    split (default: requester CPU 0, providers CPU 1), same (both CPU 0) or none (None)."""
    mode = os.environ.get("RRAM_BENCH_PIN", "split")
    if mode == "none" or (os.cpu_count() or 1) < 2 and mode == "split":
        return None
    if mode == "same":
        return {0}
    return {0} if role == "requester" else {1}


def pin_process(pid: int, cpus) -> None:
    """Pin every thread of ``pid`` (threads it starts later inherit the mask)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def pinned_here(cpus):
    """This process on ``cpus`` (None: as it is) until the block ends."""
    old = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


@contextlib.contextmanager
def pinned_tcp_cluster():
    """Two tcp provider processes (1 GiB, 64 MiB slabs) pinned as RRAM_BENCH_PIN says, and this
    process pinned as the requester until the block ends: (cluster, the pinning as a label)."""
    from rram.testing.cluster import LocalCluster

    req_cpus = bench_cpus("requester")
    with LocalCluster(n_providers=2, capacity="1GiB", transport="tcp", slab_size="64MiB", verbose=False) as cluster:
        prov_cpus = bench_cpus("provider")
        if prov_cpus:
            for proc in cluster.procs.values():
                pin_process(proc.pid, prov_cpus)
        with pinned_here(req_cpus):
            yield cluster, f"requester={sorted(req_cpus or [])} providers={sorted(prov_cpus or [])}"
