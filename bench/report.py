"""Run the host benchmark suites several times and write bench/report/: a Markdown page with
PNG plots, every figure beside its baseline from the same run, ratios as medians over runs.

    scripts/bench-report.sh                 # 3 runs of every host suite (sized for about 10 min on 2 CPUs, at most 25)
    scripts/bench-report.sh --quick         # 1 run, small sizes: proves it works, figures mean nothing
    .venv/bin/python bench/report.py --render-only DIR   # redraw DIR/README.md from DIR/raw/*.json

Each run calls pytest once per suite with ``--benchmark-json`` (raw data included) into
``OUT/raw/``; the page is drawn from those files only.  ``--swap`` adds what swaps for the
whole machine, ``--vm`` the soft-RoCE guest's suite (bench/report_vm.py); what a run did not
measure gets a section that says so instead of numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, for its sibling below
import report_vm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: swap for the whole machine, as root: only with --swap, on a machine nobody else is using
SWAP_SUITES = ("app/test_redis_swap_bench.py", "swap/test_swap_bench.py", "swap/test_farmem_vs_swap_bench.py")
SUITES = ("test_codec_bench.py", "test_store_bench.py", "test_transport_latency.py", "test_nbd_bench.py",
          "test_nbd_fio_bench.py", "test_nbd_cpu_bench.py", "test_control_bench.py", "test_faults_bench.py",
          "test_metadata_bench.py", "test_placement_bench.py", "test_frame_mac_bench.py", "test_farmem_bench.py",
          "test_seal_bench.py")
BUDGET_S = 25 * 60  # the whole full report, on the 2-CPU machine it is sized for
SUITE_TIMEOUT_S = 600  # a test that hangs fails (pytest-timeout) instead of holding the report
PIN_MODES = {"split": "requester / clients on CPU 0, providers / servers on CPU 1",
             "same": "everything on CPU 0", "none": "not pinned"}


# -- what is compared with what -------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """rram's figure against its baseline from the same run.  ``kind`` "time": lower is better,
    the ratio is rram's median over the baseline's; "rate": higher is better (pages/s or IOPS).
    A "time" baseline may be several benchmarks whose medians add up (a floor made of parts)."""

    title: str
    rram: str
    base: str | tuple[str, ...]
    kind: str
    goal: float | None = None  # for "time": ratio <= goal; for "rate": ratio >= goal
    short: str = ""  # label in the headline plot


FARMEM = "test_farmem_bench.py::"
NUMPY = "test_farmem_vs_swap_bench.py::test_numpy_workload_{}"

PAIRS = (
    Pair("store.get of a remote page, p50 / raw socket that spins (same bytes)",
         "test_store_bench.py::test_get_latency_remote_page",
         "test_store_bench.py::test_get_latency_baseline_raw_socket[spinning]", "time", 1.5,
         "store.get p50 vs spinning raw socket"),
    Pair("store.get of a remote page, p50 / raw socket that sleeps (same bytes)",
         "test_store_bench.py::test_get_latency_remote_page",
         "test_store_bench.py::test_get_latency_baseline_raw_socket[sleeping]", "time"),
    Pair("batched put, pages/s / LZ4 compress alone",
         "test_store_bench.py::test_put_many_remote", "test_store_bench.py::test_put_baseline_codec_only", "rate", 0.85,
         "batched put vs LZ4 alone"),
    Pair("batched get, pages/s / LZ4 decompress alone",
         "test_store_bench.py::test_get_many_remote", "test_store_bench.py::test_get_baseline_codec_only", "rate", 0.85,
         "batched get vs LZ4 alone"),
    Pair("sealed / plain pages: batched put, pages/s", "test_seal_bench.py::test_put_many[sealed]",
         "test_seal_bench.py::test_put_many[plain]", "rate", 0.8, "sealed put vs plain"),
    Pair("sealed / plain pages: batched get, pages/s", "test_seal_bench.py::test_get_many[sealed]",
         "test_seal_bench.py::test_get_many[plain]", "rate", 0.8, "sealed get vs plain"),
    Pair("sealed / plain pages: store.get of a remote page, p50",
         "test_seal_bench.py::test_get_latency_remote_page[sealed]",
         "test_seal_bench.py::test_get_latency_remote_page[plain]", "time", 1.25, "sealed get p50 vs plain"),
    Pair("tcp 4 KiB READ p50 / raw socket, both spinning",
         "test_transport_latency.py::test_tcp_transport_4k_read[default-spin]",
         "test_transport_latency.py::test_raw_socket_4k_request_response[default-spin]", "time"),
    Pair("tcp 4 KiB READ p50 / raw socket, both sleeping",
         "test_transport_latency.py::test_tcp_transport_4k_read[no-spin]",
         "test_transport_latency.py::test_raw_socket_4k_request_response[no-spin]", "time"),
    Pair("NBD 4 KiB write+read beyond the local budget, p50 / memory backend",
         "test_nbd_bench.py::test_write_read_4k[pagestore]", "test_nbd_bench.py::test_write_read_4k[memory]", "time"),
    *(Pair(f"fio nbd {rw} qd{qd}, IOPS / nbdkit memory",
           f"test_nbd_fio_bench.py::test_fio_4k[rram-{rw}-{qd}]",
           f"test_nbd_fio_bench.py::test_fio_4k[nbdkit-{rw}-{qd}]", "rate", 1.0, f"fio {rw} qd{qd} vs nbdkit")
      for rw in ("randread", "randwrite") for qd in (1, 32)),
    *(Pair(f"server CPU per NBD request, {rw} qd1 / nbdkit memory",
           f"test_nbd_cpu_bench.py::test_cpu_per_request[rram-{rw}]",
           f"test_nbd_cpu_bench.py::test_cpu_per_request[nbdkit-{rw}]", "time", 1.0, f"CPU per {rw} vs nbdkit")
      for rw in ("randread", "randwrite")),
    *(Pair(f"server CPU per NBD request, {rw} qd1, C path / Python path (--no-nbd-c-path)",
           f"test_nbd_cpu_bench.py::test_cpu_per_request[rram-{rw}]",
           f"test_nbd_cpu_bench.py::test_cpu_per_request[rram-py-{rw}]", "time")
      for rw in ("randread", "randwrite")),
    Pair("Redis GETs with swap on rram / on nbdkit memory (same nbdfuse + loop path), ops/s",
         "test_redis_swap_bench.py::test_redis_gets_with_swap_on[rram]",
         "test_redis_swap_bench.py::test_redis_gets_with_swap_on[nbdkit]", "rate", 1.0, "Redis GETs, swap vs nbdkit"),
    Pair("swap-bound workload on rram / on nbdkit memory (same path), seconds",
         "test_swap_bench.py::test_swap_bound_workload[rram]", "test_swap_bench.py::test_swap_bound_workload[nbdkit]",
         "time", 1.1, "swap-bound workload vs nbdkit"),
    *(Pair(f"FarMemory fault service p50, a page {kind} / floor: bare userfaultfd round trip + store.get p50 of "
           "the same kind of page",
           f"{FARMEM}test_fault_service_latency[{where}]",
           (f"{FARMEM}test_floor_bare_userfaultfd_round_trip", f"{FARMEM}test_floor_store_get[{where}]"), "time", 1.5,
           f"FarMemory fault p50 ({where} page) vs floor")
      for where, kind in (("local", "in the local pool"), ("remote", "on a provider"))),
    Pair("FarMemory sequential scan, 4x its budget, GB/s: with prefetch / without",
         f"{FARMEM}test_sequential_scan[prefetch]", f"{FARMEM}test_sequential_scan[no-prefetch]", "rate", 5.0,
         "FarMemory scan, prefetch vs none"),
    Pair("numpy workload on an array 4x its resident memory, seconds: FarMemory / swap on rram (same bytes resident, "
         "same providers)", NUMPY.format("farmem"), NUMPY.format("swap_on_rram"), "time", 0.5,
         "numpy workload, FarMemory vs swap on rram"),
    Pair("numpy workload, seconds: FarMemory / plain memory (no limit)", NUMPY.format("farmem"), NUMPY.format("plain"),
         "time"),
    Pair("numpy workload, seconds: swap on rram / plain memory (no limit)", NUMPY.format("swap_on_rram"),
         NUMPY.format("plain"), "time"),
    Pair("write path r=2 / r=1, pages/s", "test_control_bench.py::test_put_many_by_replicas[2]",
         "test_control_bench.py::test_put_many_by_replicas[1]", "rate", 0.6, "write path r=2 vs r=1"),
    Pair("longest stall of a verifying workload after SIGSTOP of a provider / with no fault, s",
         "test_faults_bench.py::test_stall_after_a_provider_fault[SIGSTOP]",
         "test_faults_bench.py::test_stall_after_a_provider_fault[none]", "time"),
    Pair("longest stall of a verifying workload after SIGKILL of a provider / with no fault, s",
         "test_faults_bench.py::test_stall_after_a_provider_fault[SIGKILL]",
         "test_faults_bench.py::test_stall_after_a_provider_fault[none]", "time"),
    Pair("back to 2 copies after a 1 s blackhole (resume) / after a SIGKILL (re-replication), s",
         "test_faults_bench.py::test_back_to_r_copies[blip]", "test_faults_bench.py::test_back_to_r_copies[SIGKILL]",
         "time"),
    Pair("reclaim MB/s, half the pages ephemeral (dropped) / all persistent (moved)",
         "test_faults_bench.py::test_reclaim_rate[half-ephemeral]", "test_faults_bench.py::test_reclaim_rate[persistent]",
         "rate"),
    Pair("native codec compress / python-lz4, pages/s", "test_codec_bench.py::test_compress[native]",
         "test_codec_bench.py::test_compress[python]", "rate"),
    Pair("allocator alloc+free / pure Python", "test_metadata_bench.py::test_alloc_free_1024_mixed[native]",
         "test_metadata_bench.py::test_alloc_free_1024_mixed[python]", "time"),
    Pair("metadata all in / Python dict (page map only), bytes a page",
         "test_metadata_bench.py::test_store_all_in_bytes_per_page[sealed]",
         "test_metadata_bench.py::test_dict_baseline_bytes_per_page", "time"),
)

#: figures that stand alone: (title, benchmark, unit shown, scale from the timed value, goal text)
FIGURES = (
    ("metadata a stored page, all in (requester heap), sealed pages",
     "test_metadata_bench.py::test_store_all_in_bytes_per_page[sealed]", "B", 1, "<= 16 B"),
    ("metadata a stored page, all in (requester heap), plain pages",
     "test_metadata_bench.py::test_store_all_in_bytes_per_page[plain]", "B", 1, "<= 16 B"),
    ("page map alone, 4M dense pages", "test_metadata_bench.py::test_pagemap_dense_bytes_per_page", "B", 1, ""),
    ("page map alone, sparse (1 page in 32)", "test_metadata_bench.py::test_pagemap_sparse_bytes_per_page", "B", 1, ""),
    ("slot allocator alone, with owner keys (local pool)",
     "test_metadata_bench.py::test_allocator_bytes_per_slot[local-pool-with-owners]", "B", 1, ""),
    ("slot allocator alone, without owners (remote slabs)",
     "test_metadata_bench.py::test_allocator_bytes_per_slot[remote-slabs]", "B", 1, ""),
    ("time to detect a SIGKILLed provider", "test_control_bench.py::test_failure_detection", "s", 1, ""),
    ("time to restore 2 copies after a SIGKILL", "test_control_bench.py::test_rereplication", "s", 1, ""),
    ("time to drain a provider (pages readable throughout)", "test_control_bench.py::test_drain", "s", 1, ""),
    ("longest stall after SIGSTOP of 1 of 3 providers (a hung node)",
     "test_faults_bench.py::test_stall_after_a_provider_fault[SIGSTOP]", "s", 1, "<= 0.6 s (the suspect threshold)"),
    ("longest stall after SIGKILL of 1 of 3 providers", "test_faults_bench.py::test_stall_after_a_provider_fault[SIGKILL]",
     "s", 1, ""),
    ("longest stall with no fault (the workload's own)", "test_faults_bench.py::test_stall_after_a_provider_fault[none]",
     "s", 1, ""),
    ("time back to 2 copies after a 1 s blackhole (resume, missed copies resynced)",
     "test_faults_bench.py::test_back_to_r_copies[blip]", "s", 1, ""),
    ("time back to 2 copies after a SIGKILL (re-replication)", "test_faults_bench.py::test_back_to_r_copies[SIGKILL]",
     "s", 1, ""),
    ("reclaim, half the pages ephemeral", "test_faults_bench.py::test_reclaim_rate[half-ephemeral]", "MB/s", 1, ""),
    ("reclaim, every page persistent", "test_faults_bench.py::test_reclaim_rate[persistent]", "MB/s", 1, ""),
    ("FarMemory fault service p50, page in the handler's local pool", f"{FARMEM}test_fault_service_latency[local]",
     "µs", 1e6, ""),
    ("FarMemory fault service p50, remote page", f"{FARMEM}test_fault_service_latency[remote]", "µs", 1e6, ""),
    ("bare userfaultfd round trip p50 (a handler process doing UFFDIO_COPY only)",
     f"{FARMEM}test_floor_bare_userfaultfd_round_trip", "µs", 1e6, ""),
    ("FarMemory sequential scan with prefetch, region 4x its budget", f"{FARMEM}test_sequential_scan[prefetch]",
     "GB/s", 1, ">= 1 GB/s over tcp"),
    ("FarMemory sequential scan without prefetch", f"{FARMEM}test_sequential_scan[no-prefetch]", "GB/s", 1, ""),
    *((f"FarMemory random 4 KiB reads, {t} thread{'s' if t > 1 else ''}, pages {where_label}",
       f"{FARMEM}test_random_faults[{t}-{where}]", "faults/s", 1, ">= 50,000")
      for t in (1, 4) for where, where_label in (("remote", "on the providers"), ("local", "in the local pool"))),
    *((f"numpy workload, array 4x its resident memory, {label}", NUMPY.format(key), "s", 1, "")
      for key, label in (("plain", "plain memory"), ("farmem", "in a FarMemory region"),
                         ("swap_on_rram", "swapping onto rram (memory cgroup)"))),
    ("placement, two choices, per call", "test_placement_bench.py::test_choose_two_choices", "µs", 1e6, ""),
    ("placement, greedy baseline, per call", "test_placement_bench.py::test_choose_greedy_baseline", "µs", 1e6, ""),
)

#: latency CDF plots: file, title, [(label, benchmark)]
CDFS = (
    ("latency_store_get.png", "store.get of a remote page vs a raw socket moving the same bytes",
     [("rram store.get", "test_store_bench.py::test_get_latency_remote_page"),
      ("raw socket, spinning", "test_store_bench.py::test_get_latency_baseline_raw_socket[spinning]"),
      ("raw socket, sleeping", "test_store_bench.py::test_get_latency_baseline_raw_socket[sleeping]")]),
    ("latency_tcp_read.png", "tcp transport 4 KiB READ vs a raw socket, same wait",
     [("rram tcp READ, spinning", "test_transport_latency.py::test_tcp_transport_4k_read[default-spin]"),
      ("raw socket, spinning", "test_transport_latency.py::test_raw_socket_4k_request_response[default-spin]"),
      ("rram tcp READ, sleeping", "test_transport_latency.py::test_tcp_transport_4k_read[no-spin]"),
      ("raw socket, sleeping", "test_transport_latency.py::test_raw_socket_4k_request_response[no-spin]")]),
    ("latency_nbd.png", "NBD 4 KiB WRITE+READ round trip beyond the local budget",
     [("rram page store", "test_nbd_bench.py::test_write_read_4k[pagestore]"),
      ("memory backend", "test_nbd_bench.py::test_write_read_4k[memory]")]),
)
FIO_CDF = ("latency_fio_qd1.png", "fio nbd, 4 KiB at queue depth 1: completion latency (fio's percentiles)")

#: throughput bars: file, title, unit, [(group label, [(bar label, benchmark)])]
BARS = (
    ("throughput_store.png", "batched put_many / get_many vs LZ4 compress / decompress alone, one core", "pages/s",
     [("put", [("rram", "test_store_bench.py::test_put_many_remote"),
               ("LZ4 alone", "test_store_bench.py::test_put_baseline_codec_only")]),
      ("get", [("rram", "test_store_bench.py::test_get_many_remote"),
               ("LZ4 alone", "test_store_bench.py::test_get_baseline_codec_only")])]),
    ("throughput_fio.png", "fio nbd 4 KiB random I/O: rram vs nbdkit memory", "IOPS",
     [(f"{rw} qd{qd}", [("rram", f"test_nbd_fio_bench.py::test_fio_4k[rram-{rw}-{qd}]"),
                        ("nbdkit memory", f"test_nbd_fio_bench.py::test_fio_4k[nbdkit-{rw}-{qd}]")])
      for rw in ("randread", "randwrite") for qd in (1, 32)]),
)

NOT_MEASURED = "## Not measured by this run\n\n"
#: added when this run did not boot the guest (no --vm)
NOT_MEASURED_VM = """* **RDMA verbs against perftest** (latency and throughput at the same queue depth) and **swap
  through the kernel's NBD client** (rram over verbs vs nbdkit on the same path vs zram vs an
  O_DIRECT disk): these need the soft-RoCE guest (`scripts/bench-report.sh --vm`, or
  `scripts/bench-vm.sh` alone).  It emulates both the CPU (TCG) and the RDMA device, so only its
  ratios mean anything.
"""

#: added when this run did not measure them (no --swap)
NOT_MEASURED_SWAP = """* **A real application swapping** (`bench/app`: Redis in a memory cgroup at about half its
  dataset, redis-benchmark GETs, swap on zram / a disk file / nbdkit / rram through nbdfuse +
  loop), **the swap-bound workload** and **the numpy workload in a FarMemory region vs swapping
  onto rram** (`bench/swap`): they turn on swap for the whole machine and need root, so the
  report runs them only when asked (`scripts/bench-report.sh --swap`, on a machine nobody else
  is using).
"""


# -- running ---------------------------------------------------------------------------------------


def run_suites(out: str, runs: int, quick: bool, suites=SUITES) -> list[dict]:
    """Every suite ``runs`` times; returns one record per suite run (file, rc, seconds)."""
    raw = os.path.join(out, "raw")
    os.makedirs(raw, exist_ok=True)
    env = dict(os.environ, RRAM_BENCH_QUICK="1" if quick else "0")
    log = []
    for run in range(1, runs + 1):
        for suite in suites:
            name = os.path.basename(suite).removesuffix(".py")
            path = os.path.join(raw, f"run{run}-{name}.json")
            t0 = time.monotonic()
            with open(os.path.join(raw, f"run{run}-{name}.log"), "w") as f:
                rc = subprocess.call([sys.executable, "-m", "pytest", f"bench/{suite}", "--benchmark-only",
                                      f"--benchmark-json={path}", "-p", "no:cacheprovider", "-q", "-rs",
                                      f"--timeout={SUITE_TIMEOUT_S}"],
                                     cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            seconds = time.monotonic() - t0
            _keep_cdf_data_only(path)
            log.append({"run": run, "suite": os.path.basename(suite), "rc": rc, "seconds": round(seconds, 1)})
            print(f"bench-report: run {run}/{runs} {suite}: exit {rc} in {seconds:.0f}s", flush=True)
    with open(os.path.join(raw, "runs.json"), "w") as f:
        json.dump({"quick": quick, "pin": os.environ.get("RRAM_BENCH_PIN", "split"), "suites": log}, f, indent=1)
    return log


def _keep_cdf_data_only(path: str) -> None:
    """Drop the per-round timings that no plot uses (some benchmarks run 100 000 rounds), so
    that raw/ stays small enough to keep with the report."""
    if not os.path.exists(path):
        return
    wanted = {key for _, _, series in CDFS for _, key in series}
    with open(path) as f:
        doc = json.load(f)
    for b in doc.get("benchmarks", []):
        if b["fullname"].rsplit("/", 1)[-1] not in wanted:
            b["stats"].pop("data", None)
    with open(path, "w") as f:
        json.dump(doc, f)


def load(out: str) -> list[dict[str, dict]]:
    """Per run: benchmark entries by 'file::name' (the suite's file name, not its path)."""
    raw = os.path.join(out, "raw")
    by_run: dict[int, dict[str, dict]] = {}
    for fn in sorted(os.listdir(raw)):
        if not (fn.startswith("run") and fn.endswith(".json")) or fn == "runs.json":
            continue
        run = int(fn[3:fn.index("-")])
        with open(os.path.join(raw, fn)) as f:
            doc = json.load(f)
        for b in doc.get("benchmarks", []):
            key = b["fullname"].rsplit("/", 1)[-1]
            by_run.setdefault(run, {})[key] = b
    return [by_run[r] for r in sorted(by_run)]


# -- figures -----------------------------------------------------------------------------------------


def _rate(b: dict) -> float:
    info = b.get("extra_info", {})
    for key in ("pages_per_s", "iops", "ops_per_s"):
        if key in info:
            return float(info[key])
    if info.get("unit", "").endswith("/s"):  # the timed value is a rate itself (bench/conftest.py ``figure``)
        return float(b["stats"]["median"])
    return 1.0 / b["stats"]["median"]


def ratios(runs: list[dict], pair: Pair) -> list[float]:
    """rram over baseline in each run that has both."""
    out = []
    bases = (pair.base,) if isinstance(pair.base, str) else pair.base
    for r in runs:
        a, bs = r.get(pair.rram), [r.get(k) for k in bases]
        if not a or not all(bs):
            continue
        if pair.kind == "time":
            out.append(a["stats"]["median"] / sum(b["stats"]["median"] for b in bs))
        else:
            out.append(_rate(a) / _rate(bs[0]))
    return out


def speedup(pair: Pair, ratio: float) -> float:
    """rram's speed relative to the baseline's (above 1: rram faster)."""
    return 1.0 / ratio if pair.kind == "time" else ratio


def _goal_text(pair: Pair, ratio: float | None) -> str:
    if pair.goal is None:
        return ""
    sign = "<=" if pair.kind == "time" else ">="
    if ratio is None:
        return f"{sign} {pair.goal}"
    met = ratio <= pair.goal if pair.kind == "time" else ratio >= pair.goal
    return f"{sign} {pair.goal}: {'met' if met else '**not met**'}"


def _fmt(x: float) -> str:
    return f"{x:,.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def machine(pin: str) -> list[str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # the report's own files are rewritten by this very run: they do not make the code dirty
    dirty = (" (with uncommitted changes)"
             if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/report") else "")
    return [f"* machine: {model}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
            f"Python {platform.python_version()}",
            f"* pinning: RRAM_BENCH_PIN={pin}: {PIN_MODES.get(pin, pin)} (fio: fio on CPU 0, servers on CPU 1)",
            f"* commit: {git('rev-parse', '--short=12', 'HEAD')}{dirty} ({git('log', '-1', '--format=%s')[:80]})",
            f"* date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]


# -- plots -------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(out: str, fname: str, title: str, series: list[tuple[str, list[float]]]) -> bool:
    import numpy as np

    series = [(label, data) for label, data in series if data]
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, data in series:
        us = np.sort(np.asarray(data) * 1e6)
        ax.step(us, np.arange(1, len(us) + 1) / len(us), where="post",
                label=f"{label} (p50 {np.median(us):.1f} µs, p99 {np.percentile(us, 99):.1f})")
    return _save_cdf(plt, fig, ax, out, fname, title, "latency, µs (log)", "fraction of requests")


def plot_percentiles(out: str, fname: str, title: str, series: list[tuple[str, dict]]) -> bool:
    series = [(label, pct) for label, pct in series if pct]
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pct in series:
        points = sorted((v, float(k) / 100) for k, v in pct.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
    return _save_cdf(plt, fig, ax, out, fname, title, "completion latency, µs (log)", "fraction of I/Os")


def _save_cdf(plt, fig, ax, out: str, fname: str, title: str, xlabel: str, ylabel: str) -> bool:
    """The axes every latency-distribution plot shares (log x), then the PNG."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, fname), dpi=110)
    plt.close(fig)
    return True


def plot_bars(out: str, fname: str, title: str, unit: str, groups: list[tuple[str, list[tuple[str, list[float]]]]]
              ) -> bool:
    groups = [(g, bars) for g, bars in groups if any(v for _, v in bars)]
    if not groups:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(b) for _, b in groups)
    for gi, (_, bars) in enumerate(groups):
        for bi, (label, values) in enumerate(bars):
            if not values:
                continue
            med = statistics.median(values)
            x = gi + (bi - (len(bars) - 1) / 2) * width
            ax.bar(x, med, width, color=f"C{bi}", label=label if gi == 0 else None)
            ax.plot([x] * len(values), values, "k.", ms=3)  # each run
            ax.annotate(_fmt(med), (x, med), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax.set_ylabel(f"{unit} (bar: median of runs; dots: each run)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, fname), dpi=110)
    plt.close(fig)
    return True


def plot_headline(out: str, rows: list[tuple[Pair, float]]) -> bool:
    rows = [(p, r) for p, r in rows if p.goal is not None]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    for i, (p, r) in enumerate(rows):
        s, goal = speedup(p, r), speedup(p, p.goal)
        met = s >= goal
        ax.barh(i, s, color="tab:green" if met else "tab:red")
        ax.plot([goal, goal], [i - 0.4, i + 0.4], "k-", lw=2)
        ax.annotate(f"{s:.2f}×", (s, i), va="center", ha="left", fontsize=8)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)), [p.short or p.title for p, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("× the baseline's speed (1 = as fast; black tick: the goal)")
    ax.set_title("rram against its baselines, each ratio from one run, median of runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "headline.png"), dpi=110)
    plt.close(fig)
    return True


# -- the page ------------------------------------------------------------------------------------------


def render(out: str) -> str:
    runs = load(out)
    meta = {"quick": False, "pin": "split", "suites": []}
    log_path = os.path.join(out, "raw", "runs.json")
    if os.path.exists(log_path):
        with open(log_path) as f:
            meta.update(json.load(f))
    quick, pin, log = meta["quick"], meta["pin"], meta["suites"]
    lines = ["# rram benchmark report", ""]
    if quick:
        lines += ["**QUICK MODE: small sizes, one run. These numbers only show that the suites run; "
                  "they measure nothing.**", ""]
    lines += machine(pin)
    lines += [f"* runs: {len(runs)} of each host suite (`scripts/bench-report.sh`); ratios are taken within a run "
              "(rram and its baseline measured minutes apart at most, same machine state), then the median over "
              "runs is shown", ""]
    failed = [e for e in log if e["rc"] != 0]
    for e in failed:
        log_name = (f"vm-run{e['run']}.log" if e["suite"] == "bench-vm.sh"
                    else f"run{e['run']}-{e['suite'].removesuffix('.py')}.log")
        lines.append(f"* **run {e['run']}: {e['suite']} exited {e['rc']}** (its log: raw/{log_name}); "
                     "its figures are missing or partial")
    if log:  # the budget is the host suites'; --swap's suites and --vm's guest come on top of it
        swap = {os.path.basename(s) for s in SWAP_SUITES}
        total = sum(e["seconds"] for e in log if e["suite"] not in swap and e["suite"] != "bench-vm.sh")
        extra = sum(e["seconds"] for e in log if e["suite"] in swap)
        guest = sum(e["seconds"] for e in log if e["suite"] == "bench-vm.sh")
        over = "" if total <= BUDGET_S else f" (**over the {BUDGET_S // 60} min budget**: shrink the suites)"
        also = f", {extra / 60:.1f} min for the swap suites (--swap)" if extra else ""
        also += f", {guest / 60:.1f} min for the soft-RoCE guest (--vm)" if guest else ""
        lines += [f"* wall time of the host suites: {total / 60:.1f} min{over}{also}", ""]

    rows = []
    table = ["| rram vs baseline | ratio, median | each run | goal |", "| --- | --- | --- | --- |"]
    for pair in PAIRS:
        rs = ratios(runs, pair)
        if not rs:
            table.append(f"| {pair.title} | not measured | | {_goal_text(pair, None)} |")
            continue
        med = statistics.median(rs)
        rows.append((pair, med))
        table.append(f"| {pair.title} | {med:.2f} | {', '.join(f'{r:.2f}' for r in rs)} | {_goal_text(pair, med)} |")
    if plot_headline(out, rows):
        lines += ["![rram's speed relative to its baselines](headline.png)", ""]
    lines += ["## Ratios", "", "Time ratios (latency, bytes): above 1 means rram takes more. Rate ratios "
              "(pages/s, IOPS): above 1 means rram does more.", ""] + table + [""]

    lines += ["## Figures", "", "| figure | median | each run | goal |", "| --- | --- | --- | --- |"]
    for title, key, unit, scale, goal in FIGURES:
        vals = [r[key]["stats"]["median"] * scale for r in runs if key in r]
        if not vals:
            lines.append(f"| {title} | not measured | | {goal} |")
            continue
        lines.append(f"| {title} | {_fmt(statistics.median(vals))} {unit} | "
                     f"{', '.join(_fmt(v) for v in vals)} | {goal} |")
    extra = _extras(runs)
    lines += [""] + extra + [""]

    lines += ["## Latency", ""]
    for fname, title, series in CDFS:
        data = [(label, [x for r in runs for x in r.get(key, {}).get("stats", {}).get("data", [])])
                for label, key in series]
        if plot_cdf(out, fname, title, data):
            lines += [f"![{title}]({fname})", ""]
        else:
            lines += [f"{title}: not measured.", ""]
    fio = [(f"{who} {rw}", runs[-1].get(f"test_nbd_fio_bench.py::test_fio_4k[{who}-{rw}-1]", {})
            .get("extra_info", {}).get("clat_percentiles_us")) for who in ("rram", "nbdkit")
           for rw in ("randread", "randwrite")] if runs else []
    if plot_percentiles(out, FIO_CDF[0], FIO_CDF[1] + " (last run)", fio):
        lines += [f"![{FIO_CDF[1]}]({FIO_CDF[0]})", ""]
    else:
        lines += [f"{FIO_CDF[1]}: not measured (fio with its nbd engine and nbdkit are needed).", ""]

    lines += _app_section(out, runs)

    lines += ["## Throughput", ""]
    for fname, title, unit, groups in BARS:
        data = [(g, [(label, [_rate(r[key]) for r in runs if key in r]) for label, key in bars]) for g, bars in groups]
        if plot_bars(out, fname, title, unit, data):
            lines += [f"![{title}]({fname})", ""]
        else:
            lines += [f"{title}: not measured.", ""]

    lines += report_vm.section(out, plot_bars)
    swap_measured = any(APP.format("rram") in r for r in runs)
    vm_measured = any(report_vm.load(out))
    if not (swap_measured and vm_measured):
        lines += [NOT_MEASURED + ("" if vm_measured else NOT_MEASURED_VM) + ("" if swap_measured else NOT_MEASURED_SWAP)]
    lines += ["## How each figure is taken", "",
              "The suites' docstrings say what each benchmark times and against what (`bench/*.py`); "
              "bench/README.md lists them.  Raw pytest-benchmark JSON and logs are in `raw/`."]
    page = "\n".join(lines) + "\n"
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(page)
    return page


APP = "test_redis_swap_bench.py::test_redis_gets_with_swap_on[{}]"
DEVICES = ("zram", "disk", "nbdkit", "rram")


def _app_section(out: str, runs: list[dict]) -> list[str]:
    """Redis GETs per swap device: a table of medians over runs and a bar plot of ops/s."""
    lines = ["## A real application: Redis GETs with swap on each device", ""]
    have = [d for d in DEVICES if any(APP.format(d) in r for r in runs)]
    if not have:
        return lines + ["Not measured by this run (`scripts/bench-report.sh --swap` runs `bench/app`).", ""]

    def med(device, field):
        vals = [r[APP.format(device)]["extra_info"][field] for r in runs if APP.format(device) in r]
        return statistics.median(vals) if vals else None

    lines += ["| swap device | GET ops/s | p50 ms | p99 ms | serving CPU µs/GET |", "| --- | --- | --- | --- | --- |"]

    def cell(d, field):
        v = med(d, field)
        return "" if v is None else _fmt(v)

    for d in have:
        lines.append(f"| {d} | {cell(d, 'ops_per_s')} | {cell(d, 'p50_ms')} | {cell(d, 'p99_ms')} | "
                     f"{cell(d, 'server_cpu_us_per_get')} |")
    bars = [(d, [("ops/s", [_rate(r[APP.format(d)]) for r in runs if APP.format(d) in r])]) for d in have]
    if plot_bars(out, "app_redis.png", "Redis GETs over random keys, dataset twice its memory cgroup", "GET ops/s",
                 bars):
        lines += ["", "![Redis GETs per swap device](app_redis.png)"]
    return lines + [""]


def _extras(runs: list[dict]) -> list[str]:
    """Derived figures the suites record in extra_info (from the last run that has them)."""
    notes = []

    def last(key, field):
        for r in reversed(runs):
            if key in r and field in r[key].get("extra_info", {}):
                return r[key]["extra_info"][field]
        return None

    per_gib = last("test_control_bench.py::test_rereplication", "restore_s_per_gib")
    if per_gib is not None:
        notes.append(f"* restore after a SIGKILL: {per_gib} s per GiB re-replicated "
                     f"({last('test_control_bench.py::test_rereplication', 'rereplicated_gib')} GiB)")
    mbs = last("test_control_bench.py::test_drain", "mb_per_s")
    if mbs is not None:
        notes.append(f"* drain: {mbs} MB/s ({last('test_control_bench.py::test_drain', 'drained_mb')} MB moved)")
    blip, kill = "test_faults_bench.py::test_back_to_r_copies[blip]", "test_faults_bench.py::test_back_to_r_copies[SIGKILL]"
    if last(blip, "mb_copied") is not None and last(kill, "detect_s") is not None:
        notes.append(f"* back to 2 copies: after the blip {last(blip, 'mb_copied')} MB of missed copies were resynced; "
                     f"after the SIGKILL {last(kill, 'mb_copied')} MB re-replicated, {last(kill, 'detect_s')} s of the "
                     "time spent detecting the death (dead threshold 2 s)")
    for seal in ("sealed", "plain"):
        key = f"test_metadata_bench.py::test_store_all_in_bytes_per_page[{seal}]"
        held = {f: last(key, f) for f in ("stored", "local", "remote", "pages", "heap_bytes", "pagemap_counted_bytes",
                                          "whole_fill_bytes_per_page")}
        if not held["stored"]:
            continue
        notes.append(f"* all-in metadata, {seal} pages: {held['local']:,} local and {held['remote']:,} remote pages stored "
                     f"({held['pages']:,} in the map with zero pages); the store counts "
                     f"{held['pagemap_counted_bytes'] / held['stored']:.1f} B a stored page of it (page map, and seal "
                     f"versions when sealed); over the whole fill, first-use buffers included: "
                     f"{held['whole_fill_bytes_per_page']} B a stored page")
    for shape in ("read1", "write1", "read256", "write256"):
        ratio = last(f"test_frame_mac_bench.py::test_paired_ratio[{shape}]", "ratio_vs_unprotected")
        if ratio is not None:
            notes.append(f"* tcp data path, {shape}: protected (REQUEST and COMPLETION MACs) / unprotected round trip "
                         f"{ratio}, the two timed alternately (goal <= 1.3)")
    for what in ("put_many", "get_many", "get"):
        ratio = last(f"test_seal_bench.py::test_paired_ratio[{what}]", "sealed_over_plain")
        if ratio is not None:
            notes.append(f"* sealed / plain pages, {what}: {ratio}, the two timed alternately (goal <= 1.25)")
    notes += _farmem_extras(last)
    remote = last("test_nbd_bench.py::test_write_read_4k[pagestore]", "remote_gets")
    if remote is not None:
        notes.append(f"* NBD round trips: {remote:,} READs went to a provider in the last run")
    return notes


def _farmem_extras(last) -> list[str]:
    """FarMemory's tails, wasted prefetch and where the numpy workload's time went."""
    notes = []
    for where in ("local", "remote"):
        p99 = last(f"{FARMEM}test_fault_service_latency[{where}]", "p99_us")
        if p99 is not None:
            notes.append(f"* FarMemory fault service p99, {where} page: {p99} µs (floor parts' p99: bare round trip "
                         f"{last(f'{FARMEM}test_floor_bare_userfaultfd_round_trip', 'p99_us')} µs, store.get "
                         f"{last(f'{FARMEM}test_floor_store_get[{where}]', 'p99_us')} µs)")
    for t in (1, 4):
        key = f"{FARMEM}test_random_faults[{t}-remote]"
        wasted = last(key, "wasted_pct")
        if wasted is not None:
            notes.append(f"* FarMemory random 4 KiB reads, {t} thread(s), remote pages: {wasted} % of the "
                         f"{last(key, 'prefetched'):,} prefetched pages wasted (goal < 10 %); "
                         f"{last(key, 'c_served_pct')} % of faults served by the handler's C loop")
    passes = {label: last(NUMPY.format(key), "pass_seconds") for key, label in
              (("plain", "plain"), ("farmem", "FarMemory"), ("swap_on_rram", "swap on rram"))}
    if any(passes.values()):
        mib = next(last(NUMPY.format(k), "working_set_mib") for k in ("plain", "farmem", "swap_on_rram")
                   if last(NUMPY.format(k), "working_set_mib"))
        notes.append(f"* numpy workload ({mib} MiB array, a quarter of it resident), seconds per pass in the last run: "
                     + "; ".join(f"{label} " + ", ".join(f"{k} {v}" for k, v in p.items())
                                 for label, p in passes.items() if p))
    counts = last(NUMPY.format("farmem"), "pass_counts")
    if counts:  # FarMemory's dirty tracking shows here: a WP fault at each page's first write
        notes.append("* numpy workload in FarMemory, faults per pass in the last run (missing / write-protect / "
                     "minor): " + "; ".join(f"{k} {c['missing_faults']:,} / {c['wp_faults']:,} / {c['minor_faults']:,}"
                                          for k, c in counts.items()))
    return notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 run: check that it works")
    ap.add_argument("--runs", type=int, default=None, help="runs of each suite (default 3; --quick: 1)")
    ap.add_argument("--out", default=None, help="output directory (default bench/report; --quick: a temp dir)")
    ap.add_argument("--suite", action="append", choices=SUITES + SWAP_SUITES, help="only this suite (repeatable)")
    ap.add_argument("--swap", action="store_true",
                    help=f"also {' and '.join(SWAP_SUITES)}: root, swap for the whole machine (not in the 25 min)")
    ap.add_argument("--vm", action="store_true",
                    help="also the soft-RoCE guest's suite (scripts/bench-vm.sh, about 8 min a run; not in the 25 min)")
    ap.add_argument("--vm-runs", type=int, default=1, help="boots of the guest suite with --vm (default 1)")
    ap.add_argument("--render-only", metavar="DIR", help="redraw DIR/README.md from DIR/raw without running")
    args = ap.parse_args(argv)
    if args.render_only:
        render(args.render_only)
        print(f"bench-report: wrote {os.path.join(args.render_only, 'README.md')}")
        return 0
    runs = args.runs or (1 if args.quick else 3)
    out = args.out or (os.path.join(os.environ.get("TMPDIR", "/tmp"), "rram-bench-report-quick") if args.quick
                       else os.path.join(ROOT, "bench", "report"))
    os.makedirs(out, exist_ok=True)
    for fn in os.listdir(out):  # a report never mixes runs of two invocations
        if fn.endswith((".png", ".md")):
            os.remove(os.path.join(out, fn))
    raw = os.path.join(out, "raw")
    if os.path.isdir(raw):
        for fn in os.listdir(raw):
            path = os.path.join(raw, fn)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    suites = tuple(args.suite or SUITES) + (SWAP_SUITES if args.swap else ())
    log = run_suites(out, runs, args.quick, suites)
    if args.vm:
        log += report_vm.run(out, args.vm_runs)
        with open(os.path.join(raw, "runs.json")) as f:
            meta = json.load(f)
        meta["suites"] = log
        with open(os.path.join(raw, "runs.json"), "w") as f:
            json.dump(meta, f, indent=1)
    render(out)
    print(f"bench-report: wrote {os.path.join(out, 'README.md')}")
    return 1 if any(e["rc"] != 0 for e in log) else 0


if __name__ == "__main__":
    sys.exit(main())
