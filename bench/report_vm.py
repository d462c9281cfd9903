"""The soft-RoCE guest's part of the benchmark report (bench/report.py ``--vm``).

``run`` boots the guest through scripts/bench-vm.sh once per run, each run's results into
``OUT/raw/vm-runN/`` (verbs-bench.json, swap-bench.json, redis-bench.json, farmem-bench.json,
as the guest writes them); ``section`` turns whatever runs are there into the report's tables,
ratios as medians over runs.  The guest emulates both the CPU (qemu TCG) and the RDMA device
(rdma_rxe), so its figures compare software paths under the same emulation, never hardware.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("verbs-bench.json", "swap-bench.json", "redis-bench.json", "farmem-bench.json")
TIMEOUT_S = 1800  # one boot of the guest and its whole bench/vm suite (about 8 min on 2 CPUs)

#: goals of the rows that have one (issue: verbs endpoint READ <= 1.3x ib_read_lat, store.get <= 1.6x)
VERBS_GOALS = {"READ 4 KiB latency p50, endpoint post+poll": ("<=", 1.3),
               "READ 4 KiB latency p50, store.get of a remote page": ("<=", 1.6)}
#: rows whose perftest figure is not the same work done the same way: shown for scale, no goal
UNLIKE = {"WRITE 4 KiB latency p50, endpoint post+poll":
          "not like for like: ib_write_lat reports half a ping-pong, rram waits for one WRITE's ACK",
          "READ throughput, store.get_many of remote pages (batch 256, one in flight)":
          "not like for like: perftest keeps 1024 READs in flight and neither decompresses nor unseals"}
REDIS_DEVICES = ("zram", "disk", "nbdkit", "rram-verbs", "rram-tcp")


def run(out: str, runs: int) -> list[dict]:
    """scripts/bench-vm.sh ``runs`` times; one log record per run (as report.run_suites')."""
    log = []
    for n in range(1, runs + 1):
        dest = os.path.join(out, "raw", f"vm-run{n}")
        os.makedirs(dest, exist_ok=True)
        t0 = time.monotonic()
        with open(os.path.join(out, "raw", f"vm-run{n}.log"), "w") as f:
            try:
                rc = subprocess.call(["scripts/bench-vm.sh"], cwd=ROOT, env=dict(os.environ, RRAM_BENCH_DIR=dest),
                                     stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = -1
        seconds = time.monotonic() - t0
        log.append({"run": n, "suite": "bench-vm.sh", "rc": rc, "seconds": round(seconds, 1)})
        print(f"bench-report: run {n}/{runs} scripts/bench-vm.sh: exit {rc} in {seconds:.0f}s", flush=True)
    return log


def load(out: str) -> list[dict[str, dict]]:
    """Per guest run: its result files by name (those that came back)."""
    raw = os.path.join(out, "raw")
    if not os.path.isdir(raw):
        return []
    runs = []
    for d in sorted((d for d in os.listdir(raw) if d.startswith("vm-run") and os.path.isdir(os.path.join(raw, d))),
                    key=lambda d: int(d[len("vm-run"):])):
        docs = {}
        for fn in FILES:
            path = os.path.join(raw, d, fn)
            if os.path.exists(path):
                with open(path) as f:
                    docs[fn] = json.load(f)
        runs.append(docs)
    return runs


def _med(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _goal(goal: tuple[str, float] | None, value: float | None) -> str:
    if goal is None:
        return ""
    op, target = goal
    if value is None:
        return f"{op} {target}"
    met = value <= target if op == "<=" else value >= target
    return f"{op} {target}: " + ("met" if met else "**not met**")


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _each(vals: list[float | None]) -> str:
    return ", ".join(f"{v:.2f}" for v in vals if v is not None)


def section(out: str, plot_bars=None) -> list[str]:
    """The guest's tables (and a plot of its Redis figures when ``plot_bars`` is given), or a
    paragraph saying the guest was not run."""
    runs = load(out)
    lines = ["## In the soft-RoCE guest (rdma_rxe under qemu TCG)", ""]
    if not any(runs):
        return lines + [
            "Not measured by this run (`scripts/bench-report.sh --vm` boots the guest, `scripts/bench-vm.sh`): "
            "rram over verbs against perftest at rram's queue depth, and swap through the kernel's own NBD client "
            "(rram over verbs and over tcp vs nbdkit on the same `/dev/nbd0` path vs zram vs an O_DIRECT disk).", ""]
    lines += [f"{len(runs)} run(s) of the guest suite (`bench/vm`, one boot each); medians over runs.  Both the "
              "CPU and the RDMA device are emulated: these ratios compare software paths under the same "
              "emulation, and no figure here stands for hardware.", ""]
    for fn, what, table in (("verbs-bench.json", "Verbs against perftest", _verbs),
                            ("redis-bench.json", "Redis in the guest", _redis),
                            ("swap-bench.json", "The swap-bound workload in the guest", _swap),
                            ("farmem-bench.json", "FarMemory vs swap in the guest", _farmem)):
        docs = [r[fn] for r in runs if fn in r]  # each boot's result, if it came back
        lines += table(docs, out, plot_bars) if docs else [f"{what}: no result came back from the guest.", ""]
    return lines


def _verbs(docs, _out, _plot) -> list[str]:
    lines = ["### rram's verbs endpoint and store against perftest (same rxe devices, same pinning)", "",
             "| metric | rram | perftest | ratio rram / perftest, median | each run | goal |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in docs[-1]["rows"]:
        metric = row["metric"]
        same = [next((x for x in d["rows"] if x["metric"] == metric), None) for d in docs]
        ratios = [x["ratio"] for x in same if x]
        med = _med(ratios)
        lines.append(f"| {metric} | {_num(_med([x['rram'] for x in same if x]))} {row['unit']} | "
                     f"{_num(_med([x['perftest'] for x in same if x]))} ({row['perftest_tool']}) | "
                     f"{med:.2f} | {_each(ratios)} | {UNLIKE.get(metric) or _goal(VERBS_GOALS.get(metric), med)} |")
    return lines + ["", "Latency rows: above 1, rram takes longer; throughput rows: above 1, rram moves more.", ""]


def _redis(docs, out, plot_bars) -> list[str]:
    lines = ["### A real application in the guest: Redis GETs, swap through `/dev/nbd0`", "",
             "| swap device | GET ops/s | p50 ms | p99 ms | serving CPU µs/GET | / nbdkit, median | each run | goal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    have = [d for d in REDIS_DEVICES if any(d in doc["runs"] for doc in docs)]
    for dev in have:
        got = [doc["runs"][dev] for doc in docs if dev in doc["runs"]]
        ratio = [doc["ops_per_s"][dev] / doc["ops_per_s"]["nbdkit"] for doc in docs
                 if dev.startswith("rram") and dev in doc["ops_per_s"] and doc["ops_per_s"].get("nbdkit")]
        med = _med(ratio)
        lines.append(f"| {dev} | {_num(_med([g['ops_per_s'] for g in got]))} | {_num(_med([g['p50_ms'] for g in got]))} | "
                     f"{_num(_med([g['p99_ms'] for g in got]))} | {_num(_med([g['server_cpu_us_per_get'] for g in got]))} | "
                     f"{'' if med is None else f'{med:.2f}'} | {_each(ratio)} | "
                     f"{_goal(('>=', 1.0), med) if dev.startswith('rram') else ''} |")
    lines.append("")
    if plot_bars is not None:
        bars = [(d, [("ops/s", [doc["ops_per_s"][d] for doc in docs if d in doc["ops_per_s"]])]) for d in have]
        if plot_bars(out, "vm_redis.png", "Redis GETs in the soft-RoCE guest, swap via /dev/nbd0", "GET ops/s", bars):
            lines += ["![Redis GETs per swap device in the guest](vm_redis.png)", ""]
    return lines


def _swap(docs, _out, _plot) -> list[str]:
    devices = [d for d in ("zram", "disk", "nbdkit", "rram") if any(d in doc["seconds"] for doc in docs)]
    ratio = [doc["ratios"].get("rram_over_nbdkit_same_path") for doc in docs]
    med = _med(ratio)
    cells = " | ".join(f"{_num(_med([doc['seconds'].get(d) for doc in docs]))} s" for d in devices)
    return ["### The swap-bound workload in the guest (rram over verbs; `/dev/nbd0` for both NBD servers)", "",
            "| " + " | ".join(devices) + " | rram / nbdkit, median | each run | goal |",
            "|" + " --- |" * (len(devices) + 3),
            f"| {cells} | {'' if med is None else f'{med:.2f}'} | {_each(ratio)} | {_goal(('<=', 1.1), med)} |", ""]


def _farmem(docs, _out, _plot) -> list[str]:
    ratio = [doc["ratios"].get("swap_over_farmem") for doc in docs]
    med = _med(ratio)
    secs = {k: _med([doc["seconds"].get(k) for doc in docs]) for k in ("plain", "farmem", "swap")}
    return ["### The numpy workload in the guest: FarMemory over verbs vs swapping onto rram through `/dev/nbd0`", "",
            "| plain memory | FarMemory | swap on rram | swap / FarMemory, median | each run | goal |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {_num(secs['plain'])} s | {_num(secs['farmem'])} s | {_num(secs['swap'])} s | "
            f"{'' if med is None else f'{med:.2f}'} | {_each(ratio)} | {_goal(('>=', 2.0), med)} |", ""]
