"""fio's nbd engine, 4 KiB random reads and writes at queue depth 1 and 32: rram vs nbdkit.

    .venv/bin/pytest bench/test_nbd_fio_bench.py -p no:cacheprovider -s

rram: `rram requester` on two tcp provider processes with a 4 MiB local budget, so nearly
every page of the 64 MiB region is compressed and remote.  Baseline, in the same run:
`nbdkit memory` (C, pages in local RAM).  Both are filled first with half-compressible data;
fio then runs RUNTIME seconds per case.  Pinning: fio on CPU 0, the servers (requester,
providers, nbdkit) on CPU 1.  The timed value is fio's own figure, seconds per I/O (1/IOPS,
bench/conftest.py ``figure``); IOPS, fio's completion-latency percentiles and the
rram/nbdkit ratio (goal >= 1.0x) in extra_info and printed.

``RRAM_BENCH_NBD_SPIN_US=0`` runs rram's NBD server with ``--nbd-spin-us 0``: it then sleeps in
recv between requests as nbdkit does, instead of spinning 50 us (like for like at queue depth 1).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from figures import scaled
from rram.testing.cluster import LocalCluster
from rram.testing.swapload import start_requester, stop_process, wait_for_path

EXPORT = 256 << 20
REGION = f"{scaled(64, 16)}M"
RUNTIME = scaled(4, 1)
ROUNDS = 1  # a round is RUNTIME seconds of I/O; bench/report.py takes the median of 3 runs
CLIENT_CPU, SERVER_CPU = "0", "1"
NBD_SPIN_US = os.environ.get("RRAM_BENCH_NBD_SPIN_US")  # None: the requester's default
NBD_SPIN_FIXED = os.environ.get("RRAM_BENCH_NBD_SPIN_FIXED") == "1"  # poll every wait, hit or miss
_iops: dict[tuple[str, str, int], float] = {}


def _pin(pid: int) -> None:
    if (os.cpu_count() or 1) > 1:
        subprocess.run(["taskset", "-a", "-c", "-p", SERVER_CPU, str(pid)], capture_output=True)


def _fio(uri: str, *args: str) -> dict:
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--bs=4k", f"--size={REGION}",
           "--output-format=json", *args]
    if (os.cpu_count() or 1) > 1:
        cmd.append(f"--cpus_allowed={CLIENT_CPU}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (job,) = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"]
    assert job["error"] == 0
    return job


def _fill(uri: str) -> None:
    _fio(uri, "--rw=write", "--iodepth=32", "--buffer_compress_percentage=50", "--refill_buffers")


def _nbdkit(tmp):
    sock = os.path.join(tmp, "nbdkit.sock")
    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", str(EXPORT)], stdin=subprocess.DEVNULL)
    try:
        wait_for_path(sock, proc)
        _pin(proc.pid)
        yield f"nbd+unix:///?socket={sock}", proc.pid
    finally:
        stop_process(proc)


def _rram(tmp, *requester_args: str):
    with LocalCluster(n_providers=2, capacity="256MiB", transport="tcp", workdir=tmp, slab_size="4MiB",
                      verbose=False, requester={"local_budget": "4MiB"}) as cluster:
        for p in cluster.procs.values():
            _pin(p.pid)
        sock = os.path.join(tmp, "nbd.sock")
        if NBD_SPIN_US is not None:
            requester_args += ("--nbd-spin-us", NBD_SPIN_US)
        if NBD_SPIN_FIXED:
            requester_args += ("--nbd-spin-fixed",)
        log = os.path.join(tmp, "requester.log")
        proc, _ = start_requester(cluster.config_path, "req", EXPORT, sock, log, extra_args=requester_args)
        try:
            _pin(proc.pid)
            yield f"nbd+unix:///?socket={sock}", proc.pid
        finally:
            assert stop_process(proc) == 0
            print(f"\nrequester {' '.join(requester_args)}: {_nbd_counters(log + '.out')}")


def _nbd_counters(out_path: str) -> dict:
    """The NBD server's counters from the requester's exit line (how many requests C served,
    the spin's hits and misses...): what explains the figures."""
    with open(out_path) as f:
        line = next((x for x in f if " stats {" in x), None)
    if line is None:
        return {}
    nbd = json.loads(line[line.index("{"):]).get("nbd", {})
    keep = ("requests", "c_requests", "c_declined", "c_runs", "c_run_requests", "c_run_declined", "runs",
            "spin_hits", "spin_misses", "spin_preempted", "spin_probes", "spin_us", "sleeps")
    return {k: nbd[k] for k in keep if k in nbd}


#: the servers: nbdkit, rram, and rram with every request on its Python path (test_nbd_cpu_bench.py)
SERVERS = {"nbdkit": _nbdkit, "rram": _rram, "rram-py": lambda tmp: _rram(tmp, "--no-nbd-c-path")}


@pytest.fixture(scope="module", params=["nbdkit", "rram"])
def server(request):
    yield from _serve(request.param)


def _serve(kind: str):
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if "nbd" not in subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout.split():
        pytest.skip("this fio has no nbd engine")
    tmp = tempfile.mkdtemp(prefix="rram-fio-")
    gen = SERVERS[kind](tmp)
    try:
        uri, pid = next(gen)
        _fill(uri)
        yield kind, uri, pid  # pid: the server process (test_nbd_cpu_bench.py reads its CPU time)
    finally:
        gen.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("iodepth", [1, 32])
@pytest.mark.parametrize("rw", ["randread", "randwrite"])
def test_fio_4k(benchmark, figure, server, rw, iodepth):
    """Timed value: seconds per I/O over fio's run (1 / IOPS), one fio run a round."""
    kind, uri, _ = server
    args = [f"--rw={rw}", f"--iodepth={iodepth}", "--time_based", f"--runtime={RUNTIME}", "--ramp_time=1",
            "--randrepeat=1", "--norandommap", "--buffer_compress_percentage=50", "--refill_buffers"]
    sides: list[dict] = []

    def run():
        side = _fio(uri, *args)["read" if rw == "randread" else "write"]
        assert side["iops"] > 0 and side["total_ios"] > 0, side
        sides.append(side)
        return 1.0 / side["iops"]

    figure(run, unit="s/IO", rounds=ROUNDS)
    iops = 1.0 / benchmark.stats.stats.median
    side = sides[-1]
    _iops[(kind, rw, iodepth)] = iops
    pct = side["clat_ns"].get("percentile", {})
    benchmark.extra_info.update(server=kind, rw=rw, iodepth=iodepth, iops=round(iops),
                                clat_percentiles_us={k: round(v / 1000, 1) for k, v in pct.items()})
    line = f"{kind:6} {rw:9} qd{iodepth:<2} {iops:9.0f} IOPS"
    base = _iops.get(("nbdkit", rw, iodepth))
    if kind == "rram" and base:
        benchmark.extra_info["rram_over_nbdkit"] = round(iops / base, 2)
        line += f"  rram/nbdkit {iops / base:.2f}x"
    print("\n" + line)
