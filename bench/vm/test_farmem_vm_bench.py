"""The numpy workload in plain memory vs in a FarMemory region vs swapping onto rram through the
kernel's NBD client, in the soft-RoCE guest, rram over verbs in both.

    scripts/bench-vm.sh -k farmem

The guest's counterpart of bench/swap/test_farmem_vs_swap_bench.py (whose host swaps through
nbdfuse + loop): the same workload (rram.testing.numpyload: fill, sum, in-place update in
random 1 MiB chunks, random gathers, sum; every result checked) over an array of
WORKING_SET_MIB, 4x the memory it may keep resident, in a fresh process each round:
* plain:  anonymous memory, no limit: the floor;
* farmem: a FarMemory region with that resident budget, its handler's store over verbs on the
  two providers of tests/vm/test_nbd_swap's stack (rxe1 -> rxe0);
* swap:   anonymous memory in a memory cgroup that leaves the array the same budget, swap on
  /dev/nbd0 (scripts/requester.sh up: `rram requester` over verbs on the same providers).
The figure is the seconds of the workload's passes, median of 3 rounds.  Pinning: the
workload on vCPU 0, every server (providers, requester, FarMemory's handler) on vCPU 1.  Goal
(issue 13): swap / FarMemory >= 2.  TCG and soft-RoCE are emulated: only the ratios count.
Results: printed and in $RRAM_BENCH_OUT/farmem-bench.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import rram
from rram.frontends.farmem import kernel_support
from rram.testing.swapload import MemoryLimit
from rram.transport import verbs
from tests.conftest import require_or_skip
from tests.vm.test_nbd_swap import _nbd_reason, swap_stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

WORKING_SET_MIB = 16
BUDGET = (WORKING_SET_MIB << 20) // 4
ROUNDS = 3
WORKLOAD_CPU, SERVER_CPU = "0", "1"
OUT_DIR = os.environ.get("RRAM_BENCH_OUT", "/tmp/rram-bench")
SECONDS: dict[str, float] = {}


def _pin(pid: int) -> None:
    subprocess.run(["taskset", "-a", "-c", "-p", SERVER_CPU, str(pid)], capture_output=True)


def _workload(where: str, *args: str) -> dict:
    argv = ["taskset", "-c", WORKLOAD_CPU, sys.executable, "-m", "rram.testing.numpyload",
            "--mib", str(WORKING_SET_MIB), "--where", where, "--budget", str(BUDGET), *args]
    if where == "farmem":
        argv += ["--server-cpu", SERVER_CPU]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"], summary["wrong"]
    return summary


def _measure(figure, benchmark, name: str, where: str, *args: str) -> None:
    last: dict = {}

    def run():
        last.update(_workload(where, *args))
        return last["seconds"]

    SECONDS[name] = figure(run, unit="s", rounds=ROUNDS)
    benchmark.extra_info.update({k: v for k, v in last.items() if k in ("pass_seconds", "pass_counts")})
    ratios = {}
    if {"farmem", "swap"} <= SECONDS.keys():
        ratios["swap_over_farmem"] = round(SECONDS["swap"] / SECONDS["farmem"], 2)
    if "plain" in SECONDS and "farmem" in SECONDS:
        ratios["farmem_over_plain"] = round(SECONDS["farmem"] / SECONDS["plain"], 2)
    print(f"\nfarmem-vm {name}: {SECONDS[name]} s (median of {ROUNDS}); last round {last}\n"
          f"seconds {SECONDS} {ratios} (goal: swap_over_farmem >= 2)")
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "farmem-bench.json"), "w") as f:
        json.dump({"seconds": SECONDS, "ratios": ratios, "working_set_mib": WORKING_SET_MIB,
                   "budget_mib": BUDGET >> 20}, f, indent=1)


GROUP = "numpy workload on an array 4x its resident memory (guest, verbs)"


@pytest.mark.benchmark(group=GROUP)
def test_numpy_workload_plain(benchmark, figure):
    _measure(figure, benchmark, "plain", "plain")


@pytest.mark.benchmark(group=GROUP)
def test_numpy_workload_farmem(benchmark, figure):
    require_or_skip(verbs.unavailable_reason())
    try:
        kernel_support()
    except (rram.RramError, OSError) as exc:
        pytest.fail(f"userfaultfd unusable in the guest: {exc}")
    with swap_stack("verbs") as stack:
        for proc in stack.cluster.procs.values():
            _pin(proc.pid)
        _measure(figure, benchmark, "farmem", "farmem", "--config", stack.config_path)


@pytest.mark.benchmark(group=GROUP)
def test_numpy_workload_swap_on_rram(benchmark, figure):
    require_or_skip(_nbd_reason())
    require_or_skip(verbs.unavailable_reason())
    limit = MemoryLimit.make(BUDGET + (512 << 20))  # the child lowers it once it knows its own footprint
    require_or_skip(None if limit else f"no memory cgroup: {MemoryLimit.reason}")
    with limit, swap_stack("verbs") as stack:
        try:
            stack.up()
            for pid in (stack.requester_pid(), *(p.pid for p in stack.cluster.procs.values())):
                _pin(pid)
            _measure(figure, benchmark, "swap", "cgroup", "--cgroup", limit.path)
        finally:
            down = stack.script("down", "/dev/nbd0")
            assert down.returncode == 0, down.stdout + down.stderr
    swapped = sum(c["pswpout"] for c in benchmark.extra_info["pass_counts"].values())
    assert swapped > 0, "the cgroup never swapped: the limit did not bind"
