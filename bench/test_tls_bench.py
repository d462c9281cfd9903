"""What TLS costs: control requests over TLS 1.3 vs plaintext, and the NBD export over TLS vs plaintext.

    .venv/bin/pytest bench/test_tls_bench.py -p no:cacheprovider -s

Control (real provider processes, tcp on loopback): a TLS cluster and a plaintext one, one
provider each, in the same run.  Figures: a new control connection (TCP, TLS handshake,
hello/auth, bye), and one alloc_slab + free_slab round trip on an open connection; each the
median over its repetitions, 3 rounds, ratio TLS / plaintext.

NBD: `rram requester` on two tcp providers with a 4 MiB local budget, every export sleeping in
recv (``--nbd-spin-us 0``, as a TLS connection must), served plaintext (its C
request loop), plaintext on the Python path (``--no-nbd-c-path``: what TLS itself costs) and
with ``--nbd-tls`` (TLS connections run on the Python path), in the same run, each on its own
cluster; nbdcopy (libnbd: ``nbds+unix://...?tls-certificates=DIR``; fio's nbd
engine refuses that URI's local file) reads and writes COPY bytes in 4 KiB requests on one
connection, 1 or 32 in flight.  Timed value: seconds per request; the TLS / plaintext IOPS
ratio is printed and kept in extra_info.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

from figures import scaled
from rram.testing.cluster import _ROOT, LocalCluster
from rram.testing.swapload import start_requester, stop_process

ROUNDS = 3
CONNECTS = scaled(50, 10)
ALLOCS = scaled(300, 30)
EXPORT = 256 << 20
COPY = scaled(32, 8) << 20
_figures: dict[tuple, float] = {}


@pytest.fixture(scope="module", params=["plain", "tls"])
def control(request):
    tmp = tempfile.mkdtemp(prefix="rram-tlsb-")
    with LocalCluster(n_providers=1, capacity="512MiB", slab_size="1MiB", replicas=1, workdir=tmp, verbose=False,
                      tls=request.param == "tls") as c:
        yield request.param, c
    shutil.rmtree(tmp, ignore_errors=True)


def _ratio(key: tuple, mode: str, value: float, benchmark, what: str) -> None:
    _figures[(mode, *key)] = value
    plain = _figures.get(("plain", *key))
    line = f"{what} {mode:5}: {value * 1e6:8.1f} us"
    if mode == "tls" and plain:
        benchmark.extra_info["tls_over_plain"] = round(value / plain, 2)
        line += f"  TLS/plain {value / plain:.2f}x"
    print("\n" + line)


@pytest.mark.benchmark(group="control connection: TCP + TLS + hello/auth + bye, s")
def test_control_connect(benchmark, figure, control):
    mode, cluster = control

    def run():
        times = []
        for i in range(CONNECTS):
            t = time.perf_counter()
            cluster.client("p0", f"bench-{i}").close()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    _ratio(("connect",), mode, figure(run, unit="s", rounds=ROUNDS), benchmark, "connect")


@pytest.mark.benchmark(group="control request: alloc_slab + free_slab, s")
def test_control_alloc_free(benchmark, figure, control):
    mode, cluster = control
    with cluster.client("p0", "bench-alloc") as client:
        def run():
            times = []
            for _ in range(ALLOCS):
                t = time.perf_counter()
                client.free_slab(client.alloc_slab(1 << 20))
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        _ratio(("alloc",), mode, figure(run, unit="s", rounds=ROUNDS), benchmark, "alloc+free")


# -- NBD -------------------------------------------------------------------------------------------


def _nbdcopy(src: str, dst: str, depth: int) -> float:
    """Seconds nbdcopy takes, one connection, ``depth`` 4 KiB requests in flight."""
    t = time.perf_counter()
    proc = subprocess.run(["nbdcopy", "--connections=1", "--threads=1", f"--requests={depth}", "--request-size=4096",
                           src, dst], capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr[-2000:]
    return took


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Half-compressible bytes, as the other NBD benchmarks write."""
    chunk = os.urandom(2048) + bytes(2048)
    path = tmp_path_factory.mktemp("tlsb") / "data"
    path.write_bytes(chunk * (COPY // 4096))
    return str(path)


@pytest.fixture(scope="module", params=["plain", "plain-py", "tls"])
def export(request, data_file):
    if shutil.which("nbdcopy") is None:
        pytest.skip("nbdcopy is not installed (Debian: libnbd-bin)")
    tmp = tempfile.mkdtemp(prefix="rram-tlsb-")
    with LocalCluster(n_providers=2, capacity="256MiB", transport="tcp", workdir=tmp, slab_size="4MiB",
                      verbose=False, requester={"local_budget": "4MiB"}) as cluster:
        sock = os.path.join(tmp, "nbd.sock")
        # every export sleeps in recv: a TLS connection cannot poll its socket (no MSG_DONTWAIT
        # through ssl), so plaintext spinning 50 us before each recv would not be the same wait
        args: tuple[str, ...] = ("--no-mlock", "--nbd-spin-us", "0") + \
            (("--no-nbd-c-path",) if request.param == "plain-py" else ())
        uri = f"nbd+unix:///?socket={sock}"
        if request.param == "tls":
            env = dict(os.environ, PYTHONPATH=_ROOT)
            for name, side in (("req", "--server"), ("bench", "--client")):
                subprocess.run([sys.executable, "-m", "rram", "keys", "tls", name, side, "--host", "localhost",
                                "--out", os.path.join(tmp, side[2:]), "--config", cluster.config_path],
                               check=True, capture_output=True, env=env)
            args += ("--nbd-tls", os.path.join(tmp, "server"))
            uri = f"nbds+unix:///?socket={sock}&tls-certificates={os.path.join(tmp, 'client')}"
        proc, _ = start_requester(cluster.config_path, "req", EXPORT, sock, os.path.join(tmp, "requester.log"),
                                  extra_args=args)
        try:
            _nbdcopy(data_file, uri, 32)  # the reads below find every page written (most of them remote)
            yield request.param, uri
        finally:
            assert stop_process(proc) == 0
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("depth", [1, 32])
@pytest.mark.parametrize("rw", ["read", "write"])
@pytest.mark.benchmark(group="NBD 4 KiB requests, nbdcopy, s/IO")
def test_nbd_4k(benchmark, figure, export, data_file, rw, depth):
    mode, uri = export
    src, dst = (uri, "null:") if rw == "read" else (data_file, uri)
    per_io = figure(lambda: _nbdcopy(src, dst, depth) / (COPY // 4096), unit="s/IO", rounds=ROUNDS)
    key = (rw, depth)
    _figures[(mode, *key)] = per_io
    line = f"nbd {mode:8} {rw:5} qd{depth:<2} {1 / per_io:9.0f} IOPS"
    for base in ("plain", "plain-py"):
        other = _figures.get((base, *key))
        if mode == "tls" and other:
            benchmark.extra_info[f"tls_over_{base}_iops"] = round(other / per_io, 2)
            line += f"  TLS/{base} {other / per_io:.2f}x"
    print("\n" + line)
