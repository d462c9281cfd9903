"""One numpy workload over an array larger than the memory it may keep resident, run where asked.

    python -m rram.testing.numpyload --mib 256 --where plain
    python -m rram.testing.numpyload --mib 256 --where farmem --config cluster.yaml --budget 64MiB \
        [--server-cpu 1]
    python -m rram.testing.numpyload --mib 256 --where cgroup --cgroup DIR --budget 64MiB

The array is ``--mib`` MiB of uint64.  Its value at index i is a pure function of i (the first
half of each 4 KiB page pseudo-random, the second half the page's tag repeated: about 2:1 under
LZ4, like swapload's pages), so every expected result is computed before the clock starts,
without the array, and every result is checked: a lost, stale or zero-filled page changes a
sum, so a wrong answer cannot be fast.  Timed passes, in order:

  fill     write every element, in order
  sum      read every element, in order
  update   a = 3a + 1 in place, 1 MiB chunks in random order
  gather   random single elements (two a page, on average), in batches
  sum      read every element again (checks the update)

Where the array lives:
* ``plain``   anonymous memory, no limit (the floor)
* ``farmem``  a FarMemory region of the cluster ``--config``, resident budget ``--budget``; its
  handler's store keeps the local pool the cluster file gives requesters; the handler is moved
  to ``--server-cpu`` (rram's servers' CPU) before the clock starts
* ``cgroup``  anonymous memory of this process inside memory cgroup ``--cgroup``, whose limit
  this process sets to ``--budget`` above what it already holds once the expected results and
  the workload's temporaries exist: the array gets the same resident bytes as the FarMemory
  region, the interpreter's own memory aside in both cases.  The kernel swaps the rest out to
  whatever swap is active.

Prints one JSON line: ok, seconds (the sum of the timed passes), seconds per pass, the checks
that failed, and what each pass cost (FarMemory's fault counters; else the machine's
pswpin/pswpout), counted between passes, off the clock; in a cgroup, its memory.events.
Exit status 0 only when every check passed.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time

import numpy as np

PAGE_WORDS = 512
CHUNK = 128 * 1024  # elements a numpy call touches: 1 MiB, so temporaries stay small
GATHER_BATCH = 16 * 1024
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: i * _MIX is a bijection, then an xorshift
_TAG = np.uint64(0x5A5A) << np.uint64(48)


def values(idx: np.ndarray) -> np.ndarray:
    """The fill's value at each index of ``idx`` (uint64): what ``fill_pages`` writes there."""
    i = idx.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = i * _MIX
    x ^= x >> np.uint64(29)
    return np.where(idx % PAGE_WORDS >= PAGE_WORDS // 2, (i // np.uint64(PAGE_WORDS)) | _TAG, x)


def fill_pages(out: np.ndarray, first: int) -> None:
    """Write the fill's values of elements [first, first + out.size) into ``out`` (whole pages,
    ``first`` page-aligned), mostly in place: a few cheap operations a word, so that the passes
    measure memory more than arithmetic."""
    pages = out.reshape(-1, PAGE_WORDS)
    half = PAGE_WORDS // 2
    idx = np.arange(first, first + out.size, dtype=np.uint64).reshape(-1, PAGE_WORDS)[:, :half]
    with np.errstate(over="ignore"):
        np.multiply(idx, _MIX, out=pages[:, :half])
    pages[:, :half] ^= pages[:, :half] >> np.uint64(29)
    pages[:, half:] = (idx[:, :1] // np.uint64(PAGE_WORDS)) | _TAG


def _sum(a: np.ndarray) -> int:
    return int(a.sum(dtype=np.uint64))


def _add(x: int, y: int) -> int:
    return (x + y) & 0xFFFF_FFFF_FFFF_FFFF


def plan(n: int, seed: int) -> dict:
    """Everything random and every expected result, computed without the array (``n`` is whole
    1 MiB chunks)."""
    rng = np.random.default_rng(seed)
    starts = np.arange(0, n, CHUNK)
    gathers = rng.integers(0, n, max(1, 2 * n // PAGE_WORDS), dtype=np.int64)
    total = 0
    scratch = np.empty(CHUNK, dtype=np.uint64)
    for first in starts.tolist():
        fill_pages(scratch, first)
        total = _add(total, _sum(scratch))
    gathered = 0
    with np.errstate(over="ignore"):
        for i in range(0, len(gathers), GATHER_BATCH):
            gathered = _add(gathered, _sum(values(gathers[i:i + GATHER_BATCH]) * np.uint64(3) + np.uint64(1)))
    return {"order": rng.permutation(starts), "starts": starts, "gathers": gathers,
            "expect": {"sum": total, "gather": gathered, "sum_after_update": _add(3 * total, n)}}


def run_passes(a: np.ndarray, p: dict, after=lambda name: None) -> tuple[dict, dict]:
    """The timed passes over ``a``; returns (seconds per pass, result per check).  ``after(name)``
    runs after each pass, off its clock (where the pages went, say)."""
    seconds, got = {}, {}

    def timed(name, fn):
        t = time.monotonic()
        fn()
        seconds[name] = round(time.monotonic() - t, 4)
        after(name)

    def fill():
        for first in p["starts"].tolist():
            fill_pages(a[first:first + CHUNK], first)

    def total(key):
        s = 0
        for first in p["starts"].tolist():
            s = _add(s, _sum(a[first:first + CHUNK]))
        got[key] = s

    def update():
        with np.errstate(over="ignore"):
            for first in p["order"].tolist():
                c = a[first:first + CHUNK]
                np.multiply(c, np.uint64(3), out=c)
                np.add(c, np.uint64(1), out=c)

    def gather():
        s, g = 0, p["gathers"]
        for i in range(0, len(g), GATHER_BATCH):
            s = _add(s, _sum(a[g[i:i + GATHER_BATCH]]))
        got["gather"] = s

    timed("fill", fill)
    timed("sum", lambda: total("sum"))
    timed("update", update)
    timed("gather", gather)
    timed("sum_after_update", lambda: total("sum_after_update"))
    return seconds, got


def _warm_up(p: dict) -> None:
    """Run each kind of temporary once, so that malloc keeps their buffers (its mmap threshold
    rises after the first free) and the cgroup's limit is set with them already held."""
    with np.errstate(over="ignore"):
        scratch = np.zeros(CHUNK, dtype=np.uint64)
        fill_pages(scratch, 0)
        _sum(scratch[p["gathers"][:GATHER_BATCH] % CHUNK] * np.uint64(3))


def _cgroup_file(cgroup: str, v2: str, v1: str) -> str:
    return os.path.join(cgroup, v2 if os.path.exists(os.path.join(cgroup, v2)) else v1)


def _limit_cgroup(cgroup: str, budget: int) -> int:
    """Set the limit to ``budget`` above this cgroup's current charge; returns the limit."""
    with open(_cgroup_file(cgroup, "memory.current", "memory.usage_in_bytes")) as f:
        limit = int(f.read()) + budget
    with open(_cgroup_file(cgroup, "memory.max", "memory.limit_in_bytes"), "w") as f:
        f.write(str(limit))
    return limit


def _counts(region) -> dict[str, int]:
    """FarMemory's fault counters, or the machine's swap I/O in pages."""
    if region is not None:
        s = region.stats()
        return {k: s[k] for k in ("missing_faults", "wp_faults", "minor_faults", "prefetched", "prefetch_hits",
                                  "wasted", "written_back")}
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f) if k in ("pswpin", "pswpout")}


def _pin_process(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` onto ``cpu`` (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except (ProcessLookupError, OSError):
            pass


def main(argv=None) -> int:
    from ..config import parse_size

    ap = argparse.ArgumentParser(prog="numpyload", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, required=True, help="array size in MiB")
    ap.add_argument("--where", choices=("plain", "farmem", "cgroup"), required=True)
    ap.add_argument("--budget", default="0", help="resident bytes for the array (farmem, cgroup)")
    ap.add_argument("--config", help="farmem: the cluster file")
    ap.add_argument("--server-cpu", type=int, help="farmem: move the handler onto this CPU")
    ap.add_argument("--cgroup", help="cgroup: join this memory cgroup and set its limit")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    budget = parse_size(a.budget)
    if a.where != "plain" and budget <= 0:
        ap.error("--budget is needed for farmem and cgroup")
    if a.where == "cgroup" and not a.cgroup:
        ap.error("--where cgroup needs --cgroup")
    if a.where == "farmem" and not a.config:
        ap.error("--where farmem needs --config")
    if a.cgroup:
        with open(os.path.join(a.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    size = a.mib << 20
    n = size // 8
    p = plan(n, a.seed)
    _warm_up(p)
    report = {"where": a.where, "mib": a.mib, "budget": budget}
    region = mapping = None
    if a.where == "farmem":
        from ..frontends.farmem import FarMemory

        region = FarMemory(a.config, size=size, budget=budget)
        if a.server_cpu is not None:
            _pin_process(region.handler_pid, a.server_cpu)
        report["handler_cpus"] = sorted(os.sched_getaffinity(region.handler_pid))
        arr = region.array(np.uint64, n)
    else:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arr = np.frombuffer(mapping, dtype=np.uint64)
        if a.where == "cgroup":
            report["limit"] = _limit_cgroup(a.cgroup, budget)
    counts = {}
    last = [_counts(region)]

    def after(name):  # what each pass cost in faults or swap I/O (vmstat: the whole machine's)
        now = _counts(region)
        counts[name] = {k: now[k] - last[0][k] for k in now}
        last[0] = now

    seconds, got = run_passes(arr, p, after)
    report.update(seconds=round(sum(seconds.values()), 4), pass_seconds=seconds, pass_counts=counts)
    report["wrong"] = {k: {"got": got[k], "expected": v} for k, v in p["expect"].items() if got.get(k) != v}
    report["ok"] = not report["wrong"]
    del arr
    if region is not None:
        region.close()
    if mapping is not None:
        mapping.close()
    if a.cgroup:
        try:
            with open(os.path.join(a.cgroup, "memory.events")) as f:
                report["memory_events"] = {k: int(v) for k, v in (line.split() for line in f)}
        except OSError:
            pass
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
