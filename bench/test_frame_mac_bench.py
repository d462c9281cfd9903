"""What signing tcp REQUEST frames costs, against the round trip it protects, in one run.

    .venv/bin/pytest bench/test_frame_mac_bench.py --benchmark-only -p no:cacheprovider

Every REQUEST carries an HMAC-SHA256 (truncated to 16 bytes) over its header and descriptors,
computed once by the requester and checked once by the provider (ext/_tcpwire.pyx, OpenSSL,
GIL released).  The path without it no longer exists, so the ratio is measured, not guessed:
``signed / (signed - 2 * mac)`` with the MAC of a frame of the same op count and the signed
round trip (in-process provider, loopback) measured in the same run; both land in
``extra_info``.  Goal: <= 1.3.
"""
from __future__ import annotations

import numpy as np
import pytest

from rram import transport
from rram._ext import _tcpwire
from rram.transport import wire

PAGE = 4096
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def link():
    if transport.unavailable_reason("tcp"):
        pytest.skip(transport.unavailable_reason("tcp"))
    pt = transport.provider_transport("tcp")
    session = pt.open_session("bench")
    region = np.zeros(256 * PAGE, np.uint8)
    rkey = session.register(region.ctypes.data, region.nbytes)
    ep = transport.requester_transport("tcp").endpoint()
    ep.connect(session.accept(ep.local_params()))
    buf = np.zeros(256 * PAGE, np.uint8)
    lkey = ep.register_local(buf.ctypes.data, buf.nbytes)
    yield ep, region, rkey, buf, lkey
    ep.close()
    pt.close()


def _ops(n, region, rkey, buf, lkey):
    ops = transport.new_ops(n)
    for i in range(n):
        ops[i] = (buf.ctypes.data + i * PAGE, region.ctypes.data + i * PAGE, PAGE, lkey, rkey, transport.OP_READ, 0)
    return ops


def _record(benchmark, name: str, n: int) -> None:
    _medians[name] = benchmark.stats.stats.median
    trip, mac = _medians.get(f"trip{n}"), _medians.get(f"mac{n}")
    if trip and mac:
        benchmark.extra_info["ratio_vs_unsigned"] = round(trip / max(trip - 2 * mac, 1e-12), 4)
        benchmark.extra_info["mac_us"] = round(mac * 1e6, 3)


@pytest.mark.parametrize("n", [1, 256])
def test_signed_read_round_trip(benchmark, link, n):
    ep, region, rkey, buf, lkey = link
    ops = _ops(n, region, rkey, buf, lkey)
    comp = transport.new_completions(1)

    def trip():
        ep.post(ops, 1)
        assert ep.poll(comp, 10.0) == 1 and comp[0]["status"] == 0

    benchmark(trip)
    _record(benchmark, f"trip{n}", n)


@pytest.mark.parametrize("n", [1, 256])
def test_frame_mac(benchmark, n):
    key = bytes(range(32))
    frame = bytes(wire.HEADER.size + n * wire.WIRE_OP.itemsize)
    benchmark(_tcpwire.frame_mac, key, frame)
    _record(benchmark, f"mac{n}", n)
