"""The same numpy workload in plain memory vs in a FarMemory region vs swapping onto rram (host).

    .venv/bin/pytest bench/swap/test_farmem_vs_swap_bench.py --benchmark-only -p no:cacheprovider -s
                                        (root; for the swap case: cgroup memory, /dev/fuse, loop)

The workload (rram.testing.numpyload: fill, sum, in-place update in random 1 MiB chunks, random
gathers, sum again; every result checked against values computed before the clock starts) runs
over an array of WORKING_SET MiB, 4x the memory it may keep resident, in a fresh child process
each round; the figure is the seconds of its passes (median of 3 rounds):
* plain:  anonymous memory, no limit: the floor
* farmem: a FarMemory region whose resident budget is a quarter of the array, its handler's
  store on two tcp provider processes
* swap:   anonymous memory in a memory cgroup whose limit leaves the array that same quarter
  (set by the child above what the interpreter already holds), swap on rram: `rram requester`
  -> nbdfuse -> loop, the kernel swapping the rest out
farmem and swap run on the same provider configuration (rram.testing.swapdevices.rram_cluster:
two tcp providers, default replicas, 4 MiB of local compressed pages for the handler's store as
for the requester's).  Goal (issue 13): swap / FarMemory >= 2.
Pinning: the workload on CPU 0; rram's servers (providers, FarMemory's handler, the requester,
nbdfuse) on CPU 1.  The kernel's swap-out runs in the workload's context, as it would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import rram
from figures import scaled
from rram.frontends.farmem import kernel_support
from rram.testing import swapdevices as D
from rram.testing.swapload import MemoryLimit

WORKING_SET_MIB = scaled(256, 64)
BUDGET = (WORKING_SET_MIB << 20) // 4
SWAP_SIZE = 2 * WORKING_SET_MIB << 20
ROUNDS = scaled(3, 1)
WORKLOAD_CPU, SERVER_CPU = "0", "1"
TIMEOUT_S = 900
_seconds: dict[str, float] = {}


def _split() -> bool:
    return (os.cpu_count() or 1) > 1


def _pin(pid: int) -> None:
    if _split():
        subprocess.run(["taskset", "-a", "-c", "-p", SERVER_CPU, str(pid)], capture_output=True)


def _workload(where: str, *args: str, limit: MemoryLimit | None = None) -> dict:
    """One run of the workload in a new process on the workload's CPU; its checked summary.
    ``limit``: the cgroup it runs in, whose events (an OOM kill) explain a failure."""
    argv = [sys.executable, "-m", "rram.testing.numpyload", "--mib", str(WORKING_SET_MIB), "--where", where, *args]
    if _split():
        argv = ["taskset", "-c", WORKLOAD_CPU] + argv + (["--server-cpu", SERVER_CPU] if where == "farmem" else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    events = f" (cgroup memory.events {limit.events()})" if limit is not None else ""
    assert proc.returncode == 0, \
        f"{where}: exit {proc.returncode}{events}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"], summary["wrong"]
    if where == "farmem" and _split():
        assert summary["handler_cpus"] == [int(SERVER_CPU)], summary
    return summary


def _measure(benchmark, figure, name: str, where: str, *args: str, limit: MemoryLimit | None = None) -> None:
    last = {}

    def run():
        last.update(_workload(where, *args, limit=limit))
        return last["seconds"]

    _seconds[name] = figure(run, unit="s", rounds=ROUNDS)
    benchmark.extra_info.update(working_set_mib=WORKING_SET_MIB, resident_budget_mib=BUDGET >> 20,
                                **{k: v for k, v in last.items() if k in ("pass_seconds", "pass_counts", "limit",
                                                                          "memory_events", "handler_cpus")})
    print(f"\n{name}: {_seconds[name]} s (median of {ROUNDS}); last round {last}")


def _ratios(benchmark) -> None:
    """The comparison, once the three have run (the report takes its ratios from the JSON)."""
    if not {"plain", "farmem", "swap"} <= _seconds.keys():
        return
    t = _seconds
    ratios = {"swap_over_farmem": round(t["swap"] / t["farmem"], 2),
              "farmem_over_plain": round(t["farmem"] / t["plain"], 2),
              "swap_over_plain": round(t["swap"] / t["plain"], 2)}
    benchmark.extra_info.update(ratios)
    print(f"numpy workload, {WORKING_SET_MIB} MiB in {BUDGET >> 20} MiB resident: seconds {t} {ratios} "
          "(goal: swap_over_farmem >= 2)")


GROUP = "numpy workload on an array 4x its resident memory"


@pytest.mark.benchmark(group=GROUP)
def test_numpy_workload_plain(benchmark, figure):
    _measure(benchmark, figure, "plain", "plain")


@pytest.mark.benchmark(group=GROUP)
def test_numpy_workload_farmem(benchmark, figure):
    try:
        kernel_support()
    except (rram.RramError, OSError) as exc:
        pytest.skip(f"userfaultfd unusable here: {exc}")
    with D.rram_cluster(SWAP_SIZE) as cluster:
        for proc in cluster.procs.values():
            _pin(proc.pid)
        _measure(benchmark, figure, "farmem", "farmem", "--config", cluster.config_path, "--budget", str(BUDGET))


@pytest.mark.benchmark(group=GROUP)
def test_numpy_workload_swap_on_rram(benchmark, figure):
    reason = D.reason()
    if reason:
        pytest.skip(reason)
    limit = MemoryLimit.make(BUDGET + (512 << 20))  # the child lowers it once it knows its own footprint
    if limit is None:
        pytest.skip(f"no memory cgroup: {MemoryLimit.reason}")
    try:
        with limit, D.swap_device("rram", SWAP_SIZE, pin=_pin):
            _measure(benchmark, figure, "swap", "cgroup", "--cgroup", limit.path, "--budget", str(BUDGET), limit=limit)
    except D.Unavailable as exc:
        pytest.skip(str(exc))
    swapped = sum(c["pswpout"] for c in benchmark.extra_info["pass_counts"].values())
    assert swapped > 0, "the cgroup never swapped: the limit did not bind"
    _ratios(benchmark)
