"""bench/report.py draws its page from pytest-benchmark JSON alone: ratios within a run, their
median over runs, goals, and plain "not measured" for what is missing."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

pytest.importorskip("matplotlib", reason="matplotlib (the bench extra) is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(ROOT, "bench", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _bench(name: str, median: float, data=None, **extra) -> dict:
    stats = {"median": median}
    if data is not None:
        stats["data"] = data
    return {"fullname": f"bench/{name}", "stats": stats, "extra_info": extra}


def test_render_from_raw_json(tmp_path):
    report = _report()
    raw = tmp_path / "raw"
    raw.mkdir()
    store, spin = "test_store_bench.py::test_get_latency_remote_page", \
        "test_store_bench.py::test_get_latency_baseline_raw_socket[spinning]"
    # run 1: rram 2x the baseline; run 2: 1.2x; run 3: 1.4x -> median 1.4, goal <= 1.5 met
    for run, (a, b) in enumerate([(40e-6, 20e-6), (24e-6, 20e-6), (28e-6, 20e-6)], start=1):
        doc = {"benchmarks": [_bench(store, a, data=[a] * 5), _bench(spin, b, data=[b] * 5)]}
        (raw / f"run{run}-test_store_bench.json").write_text(json.dumps(doc))
    app = "test_redis_swap_bench.py::test_redis_gets_with_swap_on[{}]"
    doc = {"benchmarks": [_bench(app.format(d), 1.0, ops_per_s=ops, p50_ms=p50, p99_ms=p99, server_cpu_us_per_get=cpu)
                          for d, ops, p50, p99, cpu in [("nbdkit", 6400, 7.0, 14.0, 25.0),
                                                        ("rram", 3200, 14.0, 30.0, 127.0)]]}
    (raw / "run1-test_redis_swap_bench.json").write_text(json.dumps(doc))
    (raw / "runs.json").write_text(json.dumps({"quick": False, "pin": "split", "suites": [
        {"run": 1, "suite": "test_store_bench.py", "rc": 0, "seconds": 3.0}]}))

    page = report.render(str(tmp_path))

    row = next(line for line in page.splitlines() if line.startswith("| store.get of a remote page, p50 / raw "
                                                                     "socket that spins"))
    assert "| 1.40 | 2.00, 1.20, 1.40 | <= 1.5: met |" in row
    assert "| fio nbd randread qd1, IOPS / nbdkit memory | not measured |" in page
    assert "## Not measured by this run" in page and "QUICK MODE" not in page
    for png in ("headline.png", "latency_store_get.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "latency_nbd.png" not in page  # no data: said in words, not drawn
    assert "| Redis GETs with swap on rram / on nbdkit memory (same nbdfuse + loop path), ops/s | 0.50 |" in page
    assert "| rram | 3,200 | 14 | 30 | 127 |" in page and (tmp_path / "app_redis.png").exists()


def test_a_figure_that_is_a_rate_is_compared_as_one(tmp_path):
    """bench/conftest.py ``figure`` with a unit in "/s" (reclaim MB/s): the timed value is the rate."""
    report = _report()
    raw = tmp_path / "raw"
    raw.mkdir()
    eph, per = "test_faults_bench.py::test_reclaim_rate[half-ephemeral]", "test_faults_bench.py::test_reclaim_rate[persistent]"
    doc = {"benchmarks": [_bench(eph, 300.0, unit="MB/s"), _bench(per, 100.0, unit="MB/s")]}
    (raw / "run1-test_faults_bench.json").write_text(json.dumps(doc))
    page = report.render(str(tmp_path))
    assert "| reclaim MB/s, half the pages ephemeral (dropped) / all persistent (moved) | 3.00 |" in page
    assert "| reclaim, half the pages ephemeral | 300 MB/s |" in page


def test_far_memory_figures_and_a_floor_made_of_parts(tmp_path):
    """FarMemory's fault p50 is compared with the sum of its floor's parts (bare userfaultfd round
    trip + store.get), each a timed figure; GB/s and faults/s are rates; the numpy workload's
    FarMemory / swap ratio has its goal (<= 0.5, i.e. swap at least 2x slower)."""
    report = _report()
    raw = tmp_path / "raw"
    raw.mkdir()
    fm, numpy = "test_farmem_bench.py::", "test_farmem_vs_swap_bench.py::test_numpy_workload_{}"
    doc = {"benchmarks": [
        _bench(f"{fm}test_fault_service_latency[local]", 30e-6, unit="s", p99_us=90.0),
        _bench(f"{fm}test_floor_bare_userfaultfd_round_trip", 15e-6, unit="s", p99_us=40.0),
        _bench(f"{fm}test_floor_store_get[local]", 5e-6, unit="s", p99_us=9.0),
        _bench(f"{fm}test_sequential_scan[prefetch]", 1.2, unit="GB/s"),
        _bench(f"{fm}test_sequential_scan[no-prefetch]", 0.2, unit="GB/s"),
        _bench(f"{fm}test_random_faults[1-remote]", 60000.0, unit="faults/s", prefetched=1000, wasted_pct=4.0,
               c_served_pct=97.0)]}
    (raw / "run1-test_farmem_bench.json").write_text(json.dumps(doc))
    doc = {"benchmarks": [_bench(numpy.format(k), t, unit="s", working_set_mib=256, pass_seconds={"fill": t},
                                 pass_counts={"fill": {"missing_faults": 9, "wp_faults": 16375, "minor_faults": 67}})
                          for k, t in (("plain", 0.5), ("farmem", 4.0), ("swap_on_rram", 12.0))]}
    (raw / "run1-test_farmem_vs_swap_bench.json").write_text(json.dumps(doc))

    page = report.render(str(tmp_path))

    rows = {line.split(" / ")[0].removeprefix("| FarMemory "): line for line in page.splitlines()
            if line.startswith("| FarMemory")}
    assert "| 1.50 | 1.50 | <= 1.5: met |" in rows["fault service p50, a page in the local pool"]  # 30 / (15 + 5)
    assert "| not measured |" in rows["fault service p50, a page on a provider"]  # no remote figures
    assert "without | 6.00 | 6.00 | >= 5.0: met |" in rows["sequential scan, 4x its budget, GB/s: with prefetch"]
    assert "| FarMemory random 4 KiB reads, 1 thread, pages on the providers | 60,000 faults/s |" in page
    assert "same providers) | 0.33 | 0.33 | <= 0.5: met |" in page
    assert "| numpy workload, seconds: FarMemory / plain memory (no limit) | 8.00 |" in page
    assert "4.0 % of the 1,000 prefetched pages wasted (goal < 10 %); 97.0 % of faults served by the handler's C loop" in page
    assert "local page: 90.0 µs (floor parts' p99: bare round trip 40.0 µs, store.get 9.0 µs)" in page
    assert "FarMemory fill 4.0; swap on rram fill 12.0" in page
    assert "(missing / write-protect / minor): fill 9 / 16,375 / 67" in page


def test_the_guest_section_from_its_runs(tmp_path):
    """--vm: each boot of the guest leaves raw/vm-runN/*.json (as scripts/bench-vm.sh brings them
    back); the page shows medians over the boots, each boot's ratio and the goals.  Without a
    boot, the guest is listed under "Not measured"."""
    report = _report()
    raw = tmp_path / "raw"
    raw.mkdir()
    page = report.render(str(tmp_path))
    assert "## Not measured by this run" in page and "soft-RoCE guest (`scripts/bench-report.sh --vm`" in page
    read = "READ 4 KiB latency p50, endpoint post+poll"
    write = "WRITE 4 KiB latency p50, endpoint post+poll"  # a baseline that does other work: no goal
    for n, (lat, ops, secs) in enumerate([(120.0, 400.0, 5.0), (140.0, 800.0, 9.0)], start=1):
        d = raw / f"vm-run{n}"
        d.mkdir()
        (d / "verbs-bench.json").write_text(json.dumps({"rows": [
            {"metric": read, "rram": lat, "unit": "us", "perftest_tool": "ib_read_lat", "perftest": 100.0,
             "ratio": lat / 100.0},
            {"metric": write, "rram": lat, "unit": "us", "perftest_tool": "ib_write_lat", "perftest": 50.0,
             "ratio": lat / 50.0}]}))
        runs = {dev: {"ops_per_s": o, "p50_ms": 2.0, "p99_ms": 9.0, "server_cpu_us_per_get": 50.0}
                for dev, o in (("nbdkit", 1000.0), ("rram-verbs", ops))}
        (d / "redis-bench.json").write_text(json.dumps({"ops_per_s": {k: v["ops_per_s"] for k, v in runs.items()},
                                                        "runs": runs}))
        (d / "swap-bench.json").write_text(json.dumps({"seconds": {"nbdkit": 4.0, "rram": secs},
                                                       "ratios": {"rram_over_nbdkit_same_path": secs / 4.0}}))
    page = report.render(str(tmp_path))
    assert "2 run(s) of the guest suite" in page
    assert f"| {read} | 130 us | 100 (ib_read_lat) | 1.30 | 1.20, 1.40 | <= 1.3: met |" in page
    assert f"| {write} | 130 us | 50 (ib_write_lat) | 2.60 | 2.40, 2.80 | not like for like: ib_write_lat" in page
    assert "| rram-verbs | 600 | 2 | 9 | 50 | 0.60 | 0.40, 0.80 | >= 1.0: **not met** |" in page
    assert "| 4 s | 7 s | 1.75 | 1.25, 2.25 | <= 1.1: **not met** |" in page
    assert "FarMemory vs swap in the guest: no result came back from the guest." in page
    assert (tmp_path / "vm_redis.png").exists() and "soft-RoCE guest (`scripts/bench-report.sh --vm`" not in page
