"""The protected tcp data path against the unprotected one, in one run.

    .venv/bin/pytest bench/test_frame_mac_bench.py --benchmark-only -p no:cacheprovider
    RRAM_BENCH_PIN=same|split|none   (default split: provider loop on CPU 1, requester on CPU 0)

Protected: what every tcp data connection runs since the handshake sets a frame key: each
REQUEST carries its sequence number and an HMAC-SHA256 (16 bytes) of its header and
descriptors, checked by the provider; each COMPLETION its own sequence number and an HMAC of
its header under the completion key, checked by the requester (ext/_tcpwire.pyx, OpenSSL,
GIL released); four MACs a round trip.  Unprotected: the same two C cores with no frame key
(the C API still speaks unsigned frames, which the provider and requester of rram never
use), on the same kind of connection, same ops, same bytes, same waiting (requester spins
``tcp.DEFAULT_SPIN_US``, provider loop sleeps in recv).  Both links run in this process, the
provider loop in a thread of its own as in a provider (the GIL released on both sides).
The protected round trips carry ``ratio_vs_unprotected`` in ``extra_info`` (goal: <= 1.3).
On a loaded machine the two sequential timings drift apart (the 256-op ones by 2x either
way), so ``test_paired_ratio`` times the two links alternately, trip by trip, and its figure
is the ratio of their medians: the number to quote.

``test_mac`` times one MAC: of a REQUEST of 1 and of 256 ops, of a COMPLETION, and of a
header plus 4 KiB, which is what covering READ (or WRITE) data would add per page on each side
(not done: see README "Security model"); ``share_of_read_round_trip`` puts two of those
against the unprotected 1-op READ round trip.
"""
from __future__ import annotations

import os
import secrets
import socket
import statistics
import threading
import time

import numpy as np
import pytest

from figures import bench_cpus, scaled
from rram import transport
from rram.transport import tcp, wire

PAGE = 4096
BATCH = 256
_medians: dict[str, float] = {}
SHAPES = {"read1": (transport.OP_READ, 1), "write1": (transport.OP_WRITE, 1),
          "read256": (transport.OP_READ, BATCH), "write256": (transport.OP_WRITE, BATCH)}


class _Link:
    """A provider loop (thread) and a requester core on one loopback TCP connection."""

    def __init__(self, keyed: bool):
        from rram._ext import _regions, _tcpwire

        with socket.create_server(("127.0.0.1", 0)) as lsock:
            self.csock = socket.create_connection(lsock.getsockname()[:2])
            self.ssock, _ = lsock.accept()
        for s in (self.csock, self.ssock):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.table, self.local = _regions.RegionTable(), _regions.RegionTable()
        self.region = np.frombuffer(np.random.default_rng(1).bytes(BATCH * PAGE), dtype=np.uint8).copy()
        self.buf = np.zeros(BATCH * PAGE, np.uint8)
        self.rkey = self.table.register(self.region.ctypes.data, self.region.nbytes)
        self.lkey = self.local.register(self.buf.ctypes.data, self.buf.nbytes)
        self.server = _tcpwire.WireServer(self.ssock.fileno(), None)
        self.server.spin_ns = int(tcp.DEFAULT_PROVIDER_SPIN_US * 1000)
        self.core = _tcpwire.WireRequester(self.local, 16, wire.MAX_OPS)
        self.core.spin_ns = int(tcp.DEFAULT_SPIN_US * 1000)
        self.csock.setblocking(False)
        self.core.attach(self.csock.fileno())
        if keyed:  # as the handshake does: both ends hold the connection's frame key
            key = secrets.token_bytes(32)
            self.server.set_frame_key(key)
            self.core.set_frame_key(key)
        self.result = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        cpus = bench_cpus("provider")
        if cpus:
            os.sched_setaffinity(0, cpus)  # this thread only
        self.result = self.server.serve(self.table)

    def ops(self, opcode: int, n: int) -> np.ndarray:
        ops = transport.new_ops(n)
        for i in range(n):
            ops[i] = (self.buf.ctypes.data + i * PAGE, self.region.ctypes.data + i * PAGE, PAGE, self.lkey, self.rkey,
                      opcode, 0)
        return ops

    def close(self):
        self.core.detach()
        self.csock.close()
        self.thread.join(timeout=5)
        self.server.mark_closed()
        self.server.release()
        self.ssock.close()


@pytest.fixture(scope="module")
def links():
    if transport.unavailable_reason("tcp"):
        pytest.skip(transport.unavailable_reason("tcp"))
    old = os.sched_getaffinity(0)
    cpus = bench_cpus("requester")
    if cpus:
        os.sched_setaffinity(0, cpus)
    made = {"unprotected": _Link(False), "protected": _Link(True)}
    yield made
    for link in made.values():
        link.close()
    os.sched_setaffinity(0, old)


def _record(benchmark, name: str) -> None:
    _medians[name] = benchmark.stats.stats.median
    shape = name.split(":")[1]
    plain, signed = _medians.get(f"unprotected:{shape}"), _medians.get(f"protected:{shape}")
    if plain and signed:
        benchmark.extra_info["ratio_vs_unprotected"] = round(signed / plain, 4)
        benchmark.extra_info["unprotected_us"] = round(plain * 1e6, 3)
        benchmark.extra_info["protected_us"] = round(signed * 1e6, 3)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["unprotected", "protected"])
def test_round_trip(benchmark, links, kind, shape):
    link = links[kind]
    opcode, n = SHAPES[shape]
    ops = link.ops(opcode, n)
    comp = transport.new_completions(1)
    core = link.core

    def trip():
        assert core.post(ops, 1) == 0
        assert core.poll(comp, 10.0) == 1 and comp[0]["status"] == 0

    benchmark(trip)
    if opcode == transport.OP_READ:  # every READ brought the region's bytes
        assert np.array_equal(link.buf[: n * PAGE], link.region[: n * PAGE])
    _record(benchmark, f"{kind}:{shape}")


def _trip(link, ops, comp) -> int:
    t = time.perf_counter_ns()
    assert link.core.post(ops, 1) == 0
    assert link.core.poll(comp, 10.0) == 1 and comp[0]["status"] == 0
    return time.perf_counter_ns() - t


@pytest.mark.parametrize("shape", list(SHAPES))
def test_paired_ratio(figure, benchmark, links, shape):
    """Figure: protected / unprotected median round trip, the two timed alternately (same load)."""
    opcode, n = SHAPES[shape]
    plain, signed = links["unprotected"], links["protected"]
    ops = {id(plain): plain.ops(opcode, n), id(signed): signed.ops(opcode, n)}
    comp = transport.new_completions(1)
    trips = scaled(4000 if n == 1 else 400, 50)

    def measure():
        times = {id(plain): [], id(signed): []}
        for i in range(trips):
            for link in ((plain, signed) if i % 2 else (signed, plain)):
                times[id(link)].append(_trip(link, ops[id(link)], comp))
        return statistics.median(times[id(signed)]) / statistics.median(times[id(plain)])

    benchmark.extra_info["ratio_vs_unprotected"] = round(figure(measure, unit="ratio", rounds=5), 4)


MACS = {"request-1op": wire.HEADER.size + wire.WIRE_OP.itemsize,
        "request-256op": wire.HEADER.size + BATCH * wire.WIRE_OP.itemsize,
        "completion": wire.HEADER.size, "header+4KiB": wire.HEADER.size + PAGE}


@pytest.mark.parametrize("what", list(MACS))
def test_mac(benchmark, what):
    from rram._ext import _tcpwire

    frame = bytes(MACS[what])
    benchmark(_tcpwire.FrameMac(bytes(range(32))).mac, frame)  # the cores' per-frame MAC (key set up once)
    trip = _medians.get("unprotected:read1")
    if what == "header+4KiB" and trip:
        benchmark.extra_info["share_of_read_round_trip"] = round(2 * benchmark.stats.stats.median / trip, 4)
