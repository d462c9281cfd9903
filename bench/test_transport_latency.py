"""tcp transport latency and throughput against a raw-socket baseline, servers in another process.

    .venv/bin/pytest bench/test_transport_latency.py --benchmark-only -p no:cacheprovider
    RRAM_BENCH_PIN=same|split|none   (default split: server on CPU 1, client on CPU 0)

The baseline is the least a Python request/response over loopback TCP can cost: a 32-byte
request answered with 4 KiB by ``recv_into`` + ``sendall`` (rram.testing.rawsocket), both
ends waiting as the tcp READ it is compared with does: polling first, or sleeping.  The tcp
READ adds framing, the region checks and the copies.  Medians and their ratio land in
``extra_info``.  The tcp READ runs with the default busy-polls (requester
``tcp.DEFAULT_SPIN_US``, provider ``DEFAULT_PROVIDER_SPIN_US``) and with neither.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from figures import scaled
from rram.testing import rawsocket

PAGE = 4096
BATCH = 256
ROUNDS = scaled(3000, 200)
REGION = 16 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_medians: dict[str, float] = {}


def _cpus(role: str) -> set[int] | None:
    mode = os.environ.get("RRAM_BENCH_PIN", "split")
    n = os.cpu_count() or 1
    if mode == "none":
        return None
    if mode == "same" or n < 2:
        return {0}
    return {1 if role == "server" else 0}


def _pin(role: str) -> None:
    cpus = _cpus(role)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


# -- the tcp server (runs in a child process: `python bench/test_transport_latency.py tcp`) --------


def _serve_tcp(spin_us: float) -> None:
    from rram.transport import tcp

    pt = tcp.ProviderTransportImpl(spin_us=spin_us)
    session = pt.open_session("bench")
    region = np.frombuffer(np.random.default_rng(1).bytes(REGION), dtype=np.uint8).copy()
    rkey = session.register(region.ctypes.data, REGION)
    print(json.dumps({"params": session.accept({}), "addr": int(region.ctypes.data), "rkey": rkey,
                      "crc0": zlib.crc32(region[:PAGE])}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    pt.close()


def _start(kind: str, *args: str):
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), kind, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    info = json.loads(proc.stdout.readline())
    return proc, info


def _stop(proc) -> None:
    proc.stdin.close()
    proc.wait(timeout=10)
    proc.stdout.close()


# -- fixtures ---------------------------------------------------------------------------------


def _link(provider_spin_us: float):
    from rram import transport

    _pin("client")
    proc, info = _start("tcp", str(provider_spin_us))
    ep = transport.requester_transport("tcp").endpoint()
    ep.connect(info["params"])
    local = np.zeros(BATCH * PAGE, dtype=np.uint8)
    lkey = ep.register_local(local.ctypes.data, local.size)
    yield ep, local, lkey, info
    ep.close()
    _stop(proc)


@pytest.fixture(scope="module")
def tcp_link():
    """A tcp link to a provider whose connection loop polls for requests as by default."""
    from rram.transport import tcp

    yield from _link(tcp.DEFAULT_PROVIDER_SPIN_US)


@pytest.fixture(scope="module")
def tcp_link_sleeping():
    """The same with a provider that sleeps in recv at once (the no-spin READ's like for like)."""
    yield from _link(0)


def _ops(local, lkey, info, n, opcode):
    from rram.transport import new_ops

    ops = new_ops(n)
    ops["local_addr"] = local.ctypes.data + np.arange(n, dtype=np.uint64) * PAGE
    ops["remote_addr"] = info["addr"] + np.arange(n, dtype=np.uint64) * PAGE
    ops["length"] = PAGE
    ops["lkey"] = lkey
    ops["rkey"] = info["rkey"]
    ops["opcode"] = opcode
    return ops


def _round_trip(ep, ops, out):
    ep.post(ops, 1)
    while not ep.poll(out, 5.0):
        pass
    assert out["status"][0] == 0


def _record(benchmark, name: str) -> None:
    _medians[name] = benchmark.stats.stats.median
    benchmark.extra_info["pin"] = os.environ.get("RRAM_BENCH_PIN", "split")


# -- benchmarks -------------------------------------------------------------------------------


@pytest.mark.benchmark(group="4k-read-latency")
@pytest.mark.parametrize("spin", ["default-spin", "no-spin"])
def test_raw_socket_4k_request_response(benchmark, spin):
    """The baseline of the tcp READ that waits the same way: the client polling for
    tcp.DEFAULT_SPIN_US and the server for DEFAULT_PROVIDER_SPIN_US before sleeping
    (default-spin), or both sleeping in recv at once (no-spin)."""
    from rram.transport import tcp

    _pin("client")
    spinning = spin == "default-spin"
    proc, port = rawsocket.start(_cpus("server"), spin_us=tcp.DEFAULT_PROVIDER_SPIN_US if spinning else 0)
    rtt = rawsocket.RoundTrip(port, spin_us=tcp.DEFAULT_SPIN_US if spinning else 0)
    try:
        benchmark.pedantic(rtt, rounds=ROUNDS, warmup_rounds=200)
    finally:
        rtt.close()
        rawsocket.stop(proc)
    _record(benchmark, f"raw-{spin}")


@pytest.mark.benchmark(group="4k-read-latency")
@pytest.mark.parametrize("spin", ["default-spin", "no-spin"])
def test_tcp_transport_4k_read(benchmark, request, spin):
    from rram.transport import OP_READ, new_completions, tcp

    ep, local, lkey, info = request.getfixturevalue("tcp_link" if spin == "default-spin" else "tcp_link_sleeping")
    ops = _ops(local, lkey, info, 1, OP_READ)
    out = new_completions(1)
    ep._core.spin_ns = (tcp.DEFAULT_SPIN_US if spin == "default-spin" else 0) * 1000
    try:
        benchmark.pedantic(_round_trip, args=(ep, ops, out), rounds=ROUNDS, warmup_rounds=200)
    finally:
        ep._core.spin_ns = tcp.DEFAULT_SPIN_US * 1000
    assert zlib.crc32(local[:PAGE]) == info["crc0"]
    _record(benchmark, spin)
    if f"raw-{spin}" in _medians:
        benchmark.extra_info["p50_ratio_vs_raw_socket_same_wait"] = round(_medians[spin] / _medians[f"raw-{spin}"], 2)


@pytest.mark.benchmark(group="batch-256-throughput")
@pytest.mark.parametrize("opname", ["read", "write"])
def test_tcp_transport_batch_256(benchmark, tcp_link, opname):
    from rram.transport import OP_READ, OP_WRITE, new_completions

    ep, local, lkey, info = tcp_link
    ops = _ops(local, lkey, info, BATCH, OP_READ if opname == "read" else OP_WRITE)
    out = new_completions(1)
    benchmark.pedantic(_round_trip, args=(ep, ops, out), rounds=scaled(300, 20), warmup_rounds=20)
    benchmark.extra_info["pages_per_s"] = round(BATCH / benchmark.stats.stats.median)
    _record(benchmark, opname)


@pytest.mark.benchmark(group="batch-256-throughput")
def test_raw_memcpy_batch_256(benchmark):
    """Baseline for the batch numbers: the same 256 page copies done locally in C."""
    from rram._ext._regions import copy_batch

    src = np.frombuffer(np.random.default_rng(2).bytes(BATCH * PAGE), dtype=np.uint8).copy()
    dst = np.zeros_like(src)
    offs = np.arange(BATCH, dtype=np.uint64) * PAGE
    lengths = np.full(BATCH, PAGE, dtype=np.uint32)
    benchmark(copy_batch, dst.ctypes.data + offs, src.ctypes.data + offs, lengths, BATCH)
    assert zlib.crc32(dst) == zlib.crc32(src)
    benchmark.extra_info["pages_per_s"] = round(BATCH / benchmark.stats.stats.median)


if __name__ == "__main__":
    _pin("server")
    _serve_tcp(float(sys.argv[2]))
