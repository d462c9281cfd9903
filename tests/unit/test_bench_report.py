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
    assert "| rram | 3,200 | 14.0 | 30.0 | 127.0 |" in page and (tmp_path / "app_redis.png").exists()


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
