"""The NBD C loop's adaptive spin (rram._ext._nbdserve.LoopState): it polls only while polling
catches requests.

The policy is driven here outcome by outcome, as serve_loop drives it (next_budget_ns before a
wait for a new request, observe after the wait), so nothing depends on timing.  A pause of a
millisecond or more (an idle wait) counts as a miss while the spin is on and brings the next
probe within SPIN_PROBE_FIRST waits whatever the gap was.  Then a live server: a client that
pauses far longer than the cap between requests turns the spin off (counted polls stay few,
the connection sleeps in recv), and --nbd-spin-us 0 never polls.
"""
from __future__ import annotations

import time

import pytest

from rram.frontends.nbd import protocol as P
from rram.testing.inproc import export_backend

from .test_nbd_batching import Client
from .test_nbd_cpath import _settled, serve

_nbdserve = pytest.importorskip("rram._ext._nbdserve", reason="built without liblz4: no C request path")
LoopState = _nbdserve.LoopState

CAP = 50_000
PAGE = 4096
IDLE = 2_000_000  # ns: a wait this long is a pause (ext/spin.pxd SPIN_IDLE_NS is 1 ms)


def _waits(state, outcomes):
    """Drive ``state`` through waits: each outcome is 'hit', 'miss', 'preempted' (caught, but
    after the thread was descheduled) or 'idle' (the request came IDLE ns after the wait began);
    a short wait with no budget sleeps and observes nothing.  Returns the budgets the waits had."""
    budgets = []
    for outcome in outcomes:
        budget = state.next_budget_ns()
        budgets.append(budget)
        if outcome == "idle":
            state.observe(False, waited_ns=IDLE, polled=bool(budget))
        elif budget:
            state.observe(outcome != "miss", preempted=outcome == "preempted")
    return budgets


def test_a_spin_that_catches_requests_stays_on():
    state = LoopState(CAP)
    assert _waits(state, ["hit"] * 1000) == [CAP] * 1000
    assert state.on and state.hits == 1000 and state.misses == 0


def test_a_spin_that_misses_turns_off_and_probes_ever_more_rarely():
    state = LoopState(CAP)
    budgets = _waits(state, ["miss"] * 5000)
    assert not state.on
    assert budgets[0] == CAP and budgets[1] == 0  # the first miss (nothing banked) stops it
    probes = [i for i, b in enumerate(budgets) if b][1:]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[0] == 16 and max(gaps) == 1024  # doubling, capped
    assert state.probes == len(probes) and sum(1 for b in budgets if b) < 5000 * 0.01


def test_a_probe_that_hits_turns_the_spin_back_on():
    state = LoopState(CAP)
    _waits(state, ["miss"] * 100)
    assert not state.on
    budgets = _waits(state, ["hit"] * 100)
    assert state.on
    first = next(i for i, b in enumerate(budgets) if b)
    assert budgets[first:] == [CAP] * (100 - first)


def test_banked_hits_ride_out_a_few_misses():
    state = LoopState(CAP)
    _waits(state, ["hit"] * 40)
    _waits(state, ["miss"] * 4)
    assert state.on
    _waits(state, ["miss"])
    assert not state.on


def test_the_spin_stays_on_above_about_four_hits_in_five_and_not_below():
    mostly = LoopState(CAP)
    _waits(mostly, (["hit"] * 9 + ["miss"]) * 100)
    assert mostly.on
    seldom = LoopState(CAP)
    budgets = _waits(seldom, (["hit"] * 2 + ["miss"]) * 300)
    assert sum(1 for b in budgets[-300:] if b) < 100  # mostly sleeping, probing now and then


def test_a_request_caught_after_being_descheduled_counts_neither_way():
    # the CPU went to someone else (the client itself, pinned with the server, or any other
    # load) while polling: that says nothing about whether polling pays
    state = LoopState(CAP)
    _waits(state, ["hit"] * 3 + ["preempted"] * 100)
    assert state.on and state.score == 3 and state.hits == 3 and state.misses == 0 and state.preempted == 100
    _waits(state, ["miss"])
    off = _waits(state, ["preempted"] * 200)
    assert not state.on  # nor does it turn a stopped spin on: its probes come back after the same gap
    probes = [i for i, b in enumerate(off) if b]
    assert [b - a for a, b in zip(probes, probes[1:])] == [8] * (len(probes) - 1) and len(probes) >= 20


def test_pauses_count_as_misses_while_the_spin_is_on():
    state = LoopState(CAP)
    _waits(state, ["hit"] * 40 + ["idle"] * 4)
    assert state.on and state.idle == 4 and state.misses == 0
    budgets = _waits(state, ["idle"] * 100)
    assert not state.on  # a client that only ever comes back after a pause: polling catches nothing
    probes = [i for i, b in enumerate(budgets) if b][1:]
    assert [b - a for a, b in zip(probes, probes[1:])] == [8] * (len(probes) - 1)  # cheap: one in 8


def test_after_a_pause_the_next_probe_comes_soon_whatever_the_gap_was():
    # misses push the probe gap to its cap (a batch stream); a pause, then requests that
    # follow each other: the spin is on again within 8 waits, not up to 1024 later
    state = LoopState(CAP)
    _waits(state, ["miss"] * 5000)
    assert state.probe_gap == 1024 and not state.on
    budgets = _waits(state, ["idle"] + ["hit"] * 20)
    assert state.on and state.probe_gap == 8
    first = next(i for i, b in enumerate(budgets) if b)
    assert 1 <= first <= 8 and budgets[first:] == [CAP] * (21 - first)


def test_zero_never_polls_and_fixed_always_polls():
    never = LoopState(0)
    assert _waits(never, ["hit"] * 50) == [0] * 50 and never.probes == 0
    fixed = LoopState(CAP, adaptive=False)
    assert _waits(fixed, ["miss"] * 500) == [CAP] * 500 and fixed.on and fixed.misses == 500
    with pytest.raises(ValueError):
        LoopState(-1)


def _slow_client(path: str, n: int, pause: float) -> None:
    client = Client(path, structured=False)
    try:
        data = bytes(range(256)) * (PAGE // 256)
        for handle in range(1, n + 1):
            if handle % 2:
                client.sock.sendall(client.request(P.NBD_CMD_WRITE, handle, (handle % 8) * PAGE, PAGE, data))
                assert client.reply({})[:2] == (handle, 0)
            else:
                client.sock.sendall(client.request(P.NBD_CMD_READ, handle, ((handle - 1) % 8) * PAGE, PAGE))
                assert client.reply({handle: PAGE}) == (handle, 0, data)
            time.sleep(pause)
    finally:
        client.close()


def test_a_live_connection_with_long_pauses_stops_polling(tmp_path):
    # 2 ms between requests: 40 times the 50 us cap, so no poll can catch one
    with export_backend("pagestore", 64 * PAGE) as backend, serve(backend, tmp_path, "nbd", True) as (srv, path):
        _slow_client(path, 200, 0.002)
        counters = _settled(srv)
    assert counters["c_requests"] >= 190 and counters["errors"] == 0
    polled = counters["spin_hits"] + counters["spin_misses"] + counters["spin_idle"]
    assert polled < 40, counters  # the first pause stops it; then a probe every 8 waits
    assert counters["sleeps"] >= 150, counters


def test_a_live_connection_without_spin_never_polls(tmp_path):
    with export_backend("pagestore", 64 * PAGE) as backend:
        from rram.frontends.nbd.server import NBDServer
        with NBDServer(backend, spin_us=0) as srv:
            path = str(tmp_path / "nbd.sock")
            srv.listen_unix(path)
            srv.start()
            _slow_client(path, 40, 0)
            counters = _settled(srv)
    assert counters["c_requests"] >= 35
    assert counters["spin_hits"] == counters["spin_misses"] == counters["spin_probes"] == counters["spin_us"] == 0
