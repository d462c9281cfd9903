"""The tcp requester's wait for a completion, and the provider's for the next request, poll
only while polling catches what they wait for.

WireRequester keeps the adaptive spin of ext/spin.pxd, the policy the NBD loop's LoopState
runs (tests/unit/test_nbd_spin.py drives it outcome by outcome): here the same outcomes give
the same budgets, so the two waits share one policy, not two copies.  Then live cores on a
socketpair: a provider that answers long after the cap turns the spin off (the waits sleep in
poll(), a probe now and then), a zero spin never polls, and a poll with a zero timeout only
looks (it is no wait the policy learns from).  Batches of more than SPIN_SMALL_OPS ops wait
under a policy of their own, so slow large batches leave a page's round trip polling.  The
provider's core (WireServer) waits for requests under the same policy: a requester that sends
long after the cap turns it off, a pause of a millisecond or more brings the next probe within
a few requests (however far batches had pushed it), and a zero spin never polls.  Every READ
brings its page back.
"""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from rram import transport
from rram.transport import OP_READ, wire

from .test_frame_macs import Pair  # a provider core serving a region, and a requester core

_tcpwire = pytest.importorskip("rram._ext._tcpwire")

CAP = 50_000
PAGE = 4096
SMALL_OPS = 8  # ext/spin.pxd SPIN_SMALL_OPS


def _budgets(policy, outcomes):
    budgets = []
    for outcome in outcomes:
        budget = policy.next_budget_ns()
        budgets.append(budget)
        if budget:
            policy.observe(outcome != "miss", preempted=outcome == "preempted")
    return budgets


def _requester(cap_ns: int = CAP, adaptive: bool = True):
    from rram._ext import _regions

    core = _tcpwire.WireRequester(_regions.RegionTable(), 8, 64)
    core.set_spin(cap_ns, adaptive)
    return core


SEQUENCES = {
    "hits": ["hit"] * 300,
    "misses": ["miss"] * 3000,
    "off then on": ["miss"] * 100 + ["hit"] * 100,
    "four in five": (["hit"] * 4 + ["miss"]) * 200,
    "two in three": (["hit"] * 2 + ["miss"]) * 300,
    "preempted": ["hit"] * 3 + ["preempted"] * 50 + ["miss"] + ["preempted"] * 200,
}


@pytest.mark.parametrize("name", SEQUENCES)
def test_the_completion_wait_learns_as_the_nbd_loop_does(name):
    core = _requester()
    budgets = _budgets(core, SEQUENCES[name])
    nbdserve = pytest.importorskip("rram._ext._nbdserve", reason="built without liblz4: no NBD C loop")
    loop = nbdserve.LoopState(CAP)
    assert budgets == _budgets(loop, SEQUENCES[name])
    counters = core.spin_counters()
    assert (counters["hits"], counters["misses"], counters["preempted"], counters["probes"]) == (
        loop.hits, loop.misses, loop.preempted, loop.probes)
    assert core.spin_on == loop.on


def test_misses_turn_the_completion_spin_off_and_fixed_or_zero_do_not_learn():
    core = _requester()
    budgets = _budgets(core, ["miss"] * 2000)
    assert budgets[:2] == [CAP, 0] and not core.spin_on and sum(1 for b in budgets if b) < 20
    fixed = _requester(adaptive=False)
    assert _budgets(fixed, ["miss"] * 100) == [CAP] * 100
    never = _requester(0)
    assert _budgets(never, ["hit"] * 100) == [0] * 100
    with pytest.raises(ValueError):
        never.set_spin(-1)


class SlowProvider:
    """A requester core with spin ``cap_ns`` and, on a socketpair, a provider that answers each
    READ batch ``delay`` seconds after it arrived, or ``large_delay`` seconds for a batch of
    more than SPIN_SMALL_OPS ops (unsigned frames: the C core still speaks them)."""

    def __init__(self, cap_ns: int, delay: float, large_delay: float | None = None):
        from rram._ext import _regions

        self.local = _regions.RegionTable()
        self.core = _tcpwire.WireRequester(self.local, 8, 64)
        self.core.set_spin(cap_ns)
        self.delay = delay
        self.large_delay = delay if large_delay is None else large_delay
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.region = np.random.default_rng(7).integers(0, 256, 8 * PAGE, dtype=np.uint8)
        self.buf = np.zeros(PAGE, np.uint8)
        self.lkey = self.local.register(self.buf.ctypes.data, self.buf.nbytes)
        self.core.attach(self.ours.fileno())
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        f = self.theirs.makefile("rb")
        while True:
            raw = f.read(wire.HEADER.size)
            if len(raw) < wire.HEADER.size:
                return
            h = wire.parse_header(raw, 0, wire.TO_PROVIDER)
            descs = np.frombuffer(f.read(h.count * wire.WIRE_OP.itemsize), dtype=wire.WIRE_OP)
            time.sleep(self.large_delay if h.count > SMALL_OPS else self.delay)
            data = b"".join(self.region[d["remote_addr"]: d["remote_addr"] + d["length"]].tobytes() for d in descs)
            self.theirs.sendall(wire.completion(h.batch_id, 0, h.count, data))

    def post(self, batch: int, page: int, ops: int = 1) -> None:
        """``ops`` READs of page ``page`` in one batch (each lands on the same buffer)."""
        o = transport.new_ops(ops)
        o[:] = (self.buf.ctypes.data, page * PAGE, PAGE, self.lkey, 0, OP_READ, 0)
        assert self.core.post(o, batch) == 0

    def read(self, batch: int, page: int, ops: int = 1) -> bool:
        """READ page ``page`` of the region (``ops`` times in one batch): whether its bytes came back."""
        self.post(batch, page, ops)
        comp = transport.new_completions(1)
        n = self.core.poll(comp, 10.0)
        assert n == 1 and int(comp[0]["batch_id"]) == batch and int(comp[0]["status"]) == 0
        return np.array_equal(self.buf, self.region[page * PAGE: (page + 1) * PAGE])

    def close(self):
        self.core.detach()
        self.ours.close()
        self.thread.join(timeout=5)
        self.theirs.close()


def test_a_provider_slower_than_the_cap_turns_the_spin_off():
    # 2 ms a reply: 40 times the 50 us cap, so no poll can catch one
    p = SlowProvider(CAP, 0.002)
    try:
        assert all(p.read(i + 1, i % 8) for i in range(150))
        c = p.core.spin_counters()
    finally:
        p.close()
    polled = c["hits"] + c["misses"] + c["preempted"]
    assert polled < 20, c  # the first miss stops it; then a probe every 8, 16, 32, ... waits
    assert c["sleeps"] >= 140, c  # (a read whose reply was in before its first look does not wait)


def test_slow_large_batches_leave_the_small_ones_polling():
    # a 16-op batch answered after 2 ms between single READs answered at once: one shared
    # policy would be off (a miss every other wait); the small batches' stays on and catches them
    assert _budgets(_requester(), ["miss"] * 50) != [CAP] * 50
    core = _requester()
    for _ in range(50):
        core.next_budget_ns(large=True)
        core.observe(False, large=True)
    assert core.next_budget_ns() == CAP and core.spin_on
    p = SlowProvider(CAP, 0, large_delay=0.002)
    try:
        for i in range(60):
            assert p.read(2 * i + 1, i % 8, ops=2 * SMALL_OPS)
            assert p.read(2 * i + 2, (i + 1) % 8)
        large, small = p.core.spin_counters("large"), p.core.spin_counters("small")
    finally:
        p.close()
    # the large batches' waits learnt under their own policy (off after the first miss); the
    # singles' polled under theirs, whatever the large ones did
    assert large["hits"] == 0 and 1 <= large["misses"] < 10 and large["sleeps"] >= 55, large
    assert small["hits"] + small["misses"] + small["preempted"] >= 1, small


def test_without_a_spin_the_wait_sleeps_at_once():
    p = SlowProvider(0, 0)
    try:
        assert all(p.read(i + 1, i % 8) for i in range(40))
        c = p.core.spin_counters()
    finally:
        p.close()
    assert c["hits"] == c["misses"] == c["probes"] == c["us"] == 0, c


def test_a_zero_timeout_only_looks():
    p = SlowProvider(CAP, 1.0)
    try:
        _budgets(p.core, ["miss"])  # the spin is off: the next probe is 8 waits away
        gap = p.core.spin_counters()
        p.post(1, 0)
        comp = transport.new_completions(1)
        assert all(p.core.poll(comp, 0) == 0 for _ in range(100))  # nothing yet: no wait, no probe
        assert p.core.spin_counters() == gap
        assert p.core.poll(comp, 10.0) == 1
    finally:
        p.close()


def _paced_reads(p: Pair, first: int, n: int, pause: float = 0.0, busy: bool = False) -> None:
    """READs ``first+1 .. first+n`` on ``p``, each after ``pause`` seconds (slept, or spun in
    Python when ``busy``: a sleep of 300 us wakes late by as much again)."""
    for i in range(first, first + n):
        if busy:
            end = time.perf_counter() + pause
            while time.perf_counter() < end:
                pass
        elif pause:
            time.sleep(pause)
        assert p.read(i + 1, i % 4) == (i + 1, 0)


def test_a_requester_slower_than_the_cap_turns_the_providers_spin_off():
    # a request every 300 us: 6 times the 50 us cap, so no poll of the provider's can catch one
    p = Pair(spin_ns=CAP)
    try:
        _paced_reads(p, 0, 150, 0.0003, busy=True)
        c = p.server.spin_counters()
    finally:
        p.close()
    assert p.server.spin_ns == CAP
    polled = c["hits"] + c["misses"] + c["preempted"] + c["idle"]
    assert polled < 20, c  # the first miss stops it; then a probe every 8, 16, 32, ... waits
    assert c["sleeps"] >= 130, c


def test_a_requester_that_pauses_turns_the_providers_spin_off_and_probes_every_few_requests():
    # a request every 2 ms: idle waits (ext/spin.pxd); a probe every 8 requests, which costs one
    # cap in 16 ms, and comes back as soon as requests follow each other again
    p = Pair(spin_ns=CAP)
    try:
        _paced_reads(p, 0, 150, 0.002)
        c = p.server.spin_counters()
    finally:
        p.close()
    assert 15 <= c["idle"] < 150 / 8 + 3 and c["hits"] + c["misses"] + c["preempted"] < 5, c
    assert c["sleeps"] >= 130, c


def test_after_a_pause_the_providers_spin_is_back_within_a_few_requests():
    # requests 300 us apart push the probe gap up (8, 16, ... 256 waits); after a 5 ms pause the
    # provider polls again within 8 requests, not after the old gap (whether those polls catch
    # back-to-back requests depends on the machine's load: tests/unit/test_nbd_spin.py drives
    # the policy itself)
    p = Pair(spin_ns=CAP)
    try:
        _paced_reads(p, 0, 600, 0.0003, busy=True)
        slow = p.server.spin_counters()
        time.sleep(0.005)
        _paced_reads(p, 600, 10)
        c = p.server.spin_counters()
    finally:
        p.close()

    def polled(k):
        return k["hits"] + k["misses"] + k["preempted"] + k["idle"]

    assert slow["misses"] >= 5 and slow["probes"] < 60, slow  # (a hiccup of 1 ms+ resets the gap too)
    assert polled(c) > polled(slow), (slow, c)


def test_a_provider_without_a_spin_sleeps_at_once():
    p = Pair(spin_ns=0)
    try:
        assert all(p.read(i + 1, i % 4) == (i + 1, 0) for i in range(40))
        assert np.array_equal(p.buf, p.region)
        c = p.server.spin_counters()
    finally:
        p.close()
    assert c["hits"] == c["misses"] == c["probes"] == c["us"] == 0, c
    with pytest.raises(ValueError):
        p.server.set_spin(-1)
