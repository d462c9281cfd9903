"""Membership on a fake clock: joins, heartbeats with jitter, exact thresholds, epochs, restarts."""
from __future__ import annotations

import random

import pytest

from rram import errors
from rram.control.membership import ALIVE, DEAD, EPOCH_EVENTS, KNOWN, NOT_LIVE, SUSPECT, Membership, NodeInfo

# powers of two: thresholds and jitter are exact in binary floating point
INTERVAL, SUSPECT_AFTER, DEAD_AFTER = 0.5, 2.0, 4.0


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def ms(clock):
    return Membership(clock, INTERVAL, SUSPECT_AFTER, DEAD_AFTER)


def info(inc: int = 1, free: int = 1 << 30, **kw) -> NodeInfo:
    return NodeInfo(capacity=kw.pop("capacity", 2 << 30), free=free, incarnation=inc, **kw)


def kinds(events):
    return [(e.kind, e.name) for e in events]


def test_32_nodes_join_and_heartbeat_with_jitter_stay_alive(ms, clock):
    names = [f"mem{i:02d}" for i in range(40)]
    epochs = []
    for n in names:
        ev = ms.join(n, info())
        assert kinds(ev) == [("joined", n)]
        epochs.append(ms.epoch)
    assert epochs == list(range(1, 41))  # one step per live-set change
    assert ms.live() == names
    rng = random.Random(7)
    jitter = [INTERVAL + k / 16 for k in range(-3, 4)]  # interval +- 3/8 of it, exact in binary
    next_beat = {n: clock.t + rng.choice(jitter) for n in names}
    for _ in range(400):
        clock.advance(1 / 16)
        for n in names:
            if clock.t >= next_beat[n]:
                assert ms.heartbeat(n, info(free=rng.randrange(1 << 30))) == []
                next_beat[n] = clock.t + rng.choice(jitter)
        assert ms.tick() == []
    assert ms.epoch == 40 and all(ms.state(n) == ALIVE for n in names)


def test_jittered_heartbeats_below_suspect_threshold_never_suspect(ms, clock):
    names = [f"n{i}" for i in range(32)]
    for n in names:
        ms.join(n, info())
    rng = random.Random(1)
    next_beat = {n: clock.t + rng.choice([0.25, 0.5, 0.75, 1.0, 1.5]) for n in names}
    end = clock.t + 60
    while clock.t < end:
        clock.advance(0.125)
        for n in names:
            if clock.t >= next_beat[n]:
                ms.heartbeat(n, info(load=rng.random() * 4))
                next_beat[n] = clock.t + rng.choice([0.25, 0.5, 0.75, 1.0, 1.5])  # < suspect_after
        assert ms.tick() == []
    assert ms.epoch == 32


def test_suspect_and_dead_exactly_at_thresholds(ms, clock):
    ms.join("a", info())
    t0 = clock.t
    clock.t = t0 + SUSPECT_AFTER - 0.125
    assert ms.tick() == [] and ms.state("a") == ALIVE
    clock.t = t0 + SUSPECT_AFTER
    ev = ms.tick()
    assert kinds(ev) == [("suspect", "a")] and ms.state("a") == SUSPECT
    assert ev[0].epoch == 1 and ms.epoch == 1  # suspect nodes are still live
    assert ms.tick() == []  # no repeated event
    clock.t = t0 + DEAD_AFTER - 0.125
    assert ms.tick() == [] and ms.live() == ["a"]
    clock.t = t0 + DEAD_AFTER
    ev = ms.tick()
    assert kinds(ev) == [("dead", "a")] and ev[0].epoch == 2 and ms.epoch == 2
    assert ms.state("a") == DEAD and ms.live() == [] and ms.node_epoch("a") == NOT_LIVE
    clock.advance(100)
    assert ms.tick() == [] and ms.state("a") == DEAD  # stays dead without heartbeats


def test_late_tick_goes_straight_to_dead(ms, clock):
    ms.join("a", info())
    clock.advance(DEAD_AFTER * 3)
    assert kinds(ms.tick()) == [("dead", "a")]


def test_suspect_heartbeat_is_alive_again_without_epoch_change(ms, clock):
    ms.join("a", info())
    ne = ms.node_epoch("a")
    clock.advance(SUSPECT_AFTER)
    ms.tick()
    clock.advance(0.5)
    ev = ms.heartbeat("a", info())
    assert kinds(ev) == [("alive_again", "a")] and ms.epoch == 1 and ms.node_epoch("a") == ne
    clock.advance(SUSPECT_AFTER - 0.125)  # the silence restarts from the new heartbeat
    assert ms.tick() == []


def test_epoch_unchanged_by_heartbeats_suspicion_and_info(ms, clock):
    for n in "abc":
        ms.join(n, info())
    e = ms.epoch
    for i in range(10):
        clock.advance(0.25)
        ms.heartbeat("a", info(free=i, load=i / 2))
        ms.heartbeat("b", info())
    assert ms.epoch == e  # c has been silent for 2.5 s, but only tick() changes states
    assert kinds(ms.tick()) == [("suspect", "c")] and ms.epoch == e


def test_restart_after_dead_is_detected(ms, clock):
    ms.join("a", info(inc=100))
    clock.advance(DEAD_AFTER)
    ms.tick()
    ev = ms.heartbeat("a", info(inc=200))
    assert kinds(ev) == [("restarted", "a")] and ev[0].incarnation == 200 and ms.epoch == 3
    assert ms.state("a") == ALIVE and ms.node_epoch("a") == 3


def test_fast_restart_while_alive_changes_epoch(ms, clock):
    ms.join("a", info(inc=1))
    before = ms.node_epoch("a")
    clock.advance(0.5)
    ev = ms.heartbeat("a", info(inc=2))
    assert kinds(ev) == [("restarted", "a")] and ms.epoch == 2
    assert before == 1 and ms.node_epoch("a") == 2


def test_partition_heal_same_incarnation_rejoins_with_new_node_epoch(ms, clock):
    ms.join("a", info(inc=5))
    old = ms.node_epoch("a")
    clock.advance(DEAD_AFTER)
    ms.tick()
    clock.advance(30)
    ev = ms.heartbeat("a", info(inc=5))
    assert kinds(ev) == [("rejoined", "a")] and ms.state("a") == ALIVE
    assert ms.node_epoch("a") > old and ms.epoch == 3


def test_old_incarnation_heartbeats_are_ignored(ms, clock):
    ms.join("a", info(inc=9))
    clock.advance(1)
    assert ms.heartbeat("a", info(inc=8)) == []
    assert ms.info("a").incarnation == 9 and ms.counters["stale_heartbeats"] == 1
    clock.advance(SUSPECT_AFTER - 1)  # the stale heartbeat did not refresh the timer
    assert kinds(ms.tick()) == [("suspect", "a")]


def test_known_nodes_are_not_live_until_heartbeat(ms, clock):
    ms.add("mem1", failure_domain="rack1")  # as the keeper adds the cluster file's providers
    ms.add("host", roles=["requester"])
    assert ms.state("mem1") == KNOWN and ms.live() == [] and ms.epoch == 0
    clock.advance(DEAD_AFTER * 10)
    assert ms.tick() == []  # a node never heard of is not dead, just not up yet
    assert kinds(ms.heartbeat("mem1", info())) == [("joined", "mem1")]
    assert ms.info("mem1").failure_domain == "rack1"  # the cluster file's label is kept
    ms.heartbeat("host", info())
    assert [c.name for c in ms.candidates()] == ["mem1"]  # "host" is not a provider


def test_candidates_exclude_suspect_draining_dead_and_self(ms, clock):
    for n in "abcde":
        ms.join(n, info())
    clock.advance(SUSPECT_AFTER)
    for n in "abd":
        ms.heartbeat(n, info())
    ev = ms.heartbeat("d", info(draining=True))
    assert kinds(ev) == [("draining", "d")] and ms.heartbeat("d", info(draining=True)) == []
    ms.tick()
    assert ms.state("c") == SUSPECT and ms.live() == list("abcde")
    assert [c.name for c in ms.candidates(exclude="a")] == ["b"]
    clock.advance(DEAD_AFTER)
    ms.heartbeat("b", info())
    ms.tick()
    assert [c.name for c in ms.candidates()] == ["b"]


def test_every_epoch_event_bumps_by_one_and_others_do_not(ms, clock):
    rng = random.Random(3)
    names = [f"n{i}" for i in range(32)]
    inc = {n: 1 for n in names}
    seen = ms.epoch
    for _ in range(400):
        op = rng.random()
        n = rng.choice(names)
        if op < 0.6:
            if rng.random() < 0.05:
                inc[n] += 1
            events = ms.join(n, info(inc=inc[n]))
        else:
            clock.advance(rng.choice([0.25, 0.5, 1.0, 2.0]))
            events = ms.tick()
        for e in events:
            expected = seen + 1 if e.kind in EPOCH_EVENTS else seen
            assert e.epoch == expected, e
            seen = e.epoch
        assert ms.epoch == seen
        live = {name for name in names if name in ms and ms.state(name) in (ALIVE, SUSPECT)}
        assert live == set(ms.live())
        for name in ms.live():
            assert 1 <= ms.node_epoch(name) <= ms.epoch


def test_bad_input_is_a_clear_error(ms, clock):
    with pytest.raises(errors.NotFound, match="join it first"):
        ms.heartbeat("ghost", info())
    with pytest.raises(errors.ProtocolError, match="free"):
        NodeInfo(free=-1)
    with pytest.raises(errors.ProtocolError, match="load"):
        NodeInfo(load=float("nan"))
    with pytest.raises(errors.ProtocolError, match="capacity"):
        NodeInfo.from_heartbeat({"incarnation": 1, "free": 0, "load": 0.0})
    with pytest.raises(errors.ConfigError, match="suspect_after < dead_after"):
        Membership(clock, 1.0, 5.0, 5.0)
    ms.add("x")
    with pytest.raises(errors.ConfigError, match="twice"):
        ms.add("x")


def test_from_heartbeat_reply(ms, clock):
    reply = {"incarnation": 1712345678901, "capacity": 1 << 30, "free": 1 << 29, "load": 0.75, "state": "draining"}
    ni = NodeInfo.from_heartbeat(reply, failure_domain="rack2")
    assert ni.incarnation == 1712345678901 and ni.draining and ni.failure_domain == "rack2"
    assert kinds(ms.join("a", ni)) == [("joined", "a"), ("draining", "a")]
    assert ms.epoch == 1 and ms.live() == ["a"] and ms.candidates() == []  # draining: no new slabs
