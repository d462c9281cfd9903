"""Placement: property tests (hypothesis) and the seed's topologies (symmetric, RAM server)."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rram import errors
from rram.control.placement import Candidate, choose_targets

SLAB = 64 << 20
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def clusters(draw, min_nodes=1, max_nodes=24):
    n = draw(st.integers(min_nodes, max_nodes))
    labelled = draw(st.booleans())
    n_domains = draw(st.integers(1, max(1, n)))
    cands = []
    for i in range(n):
        cands.append(Candidate(
            name=f"n{i:02d}",
            free=draw(st.sampled_from([0, SLAB - 1, SLAB, 2 * SLAB, 5 * SLAB, 40 * SLAB])),
            load=draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])),
            failure_domain=f"rack{draw(st.integers(0, n_domains - 1))}" if labelled else None,
        ))
    return cands


def _domains(cands, names):
    by = {c.name: c for c in cands}
    return [by[n].domain for n in names]


@FAST
@given(cands=clusters(), r=st.integers(1, 4), seed=st.integers(0, 2**32), exclude_one=st.booleans())
def test_choose_targets_properties(cands, r, seed, exclude_one):
    exclude = (cands[0].name,) if exclude_one else ()
    usable = [c for c in cands if c.free >= SLAB and c.name not in exclude]
    usable_domains = {c.domain for c in usable}
    try:
        p = choose_targets(cands, r, rng=random.Random(seed), exclude=exclude, need_bytes=SLAB, allow_degraded=True)
    except errors.StoreFullError:
        assert not usable
        return
    names = list(p)
    assert len(names) == len(set(names)) == min(r, len(usable))  # distinct, as many as possible
    assert p.degraded == (len(usable) < r)
    by = {c.name: c for c in cands}
    assert all(by[n].free >= SLAB and n not in exclude for n in names)  # capacity, exclusions
    doms = _domains(cands, names)
    assert len(set(doms)) == min(len(names), len(usable_domains))  # as many domains as exist
    assert p.domains_spread == (len(set(doms)) == len(doms))


@FAST
@given(cands=clusters(min_nodes=1, max_nodes=6), r=st.integers(1, 4), seed=st.integers(0, 2**32))
def test_choose_targets_strict_raises_when_short(cands, r, seed):
    usable = [c for c in cands if c.free >= SLAB]
    if len(usable) >= r:
        assert len(choose_targets(cands, r, rng=random.Random(seed), need_bytes=SLAB)) == r
    else:
        with pytest.raises(errors.StoreFullError, match=f"need {r} distinct providers"):
            choose_targets(cands, r, rng=random.Random(seed), need_bytes=SLAB)


def test_two_choices_skews_toward_free_nodes():
    # free bytes 1..16 slabs: the emptiest nodes are chosen far more often than uniform
    cands = [Candidate(f"n{i:02d}", free=(i + 1) * SLAB) for i in range(16)]
    rng = random.Random(42)
    picks = Counter(choose_targets(cands, 1, rng=rng, need_bytes=SLAB)[0] for _ in range(8000))
    top, bottom = sum(picks[f"n{i:02d}"] for i in range(12, 16)), sum(picks[f"n{i:02d}"] for i in range(4))
    # exact odds for the best of two uniform samples without replacement: top quarter 0.44, bottom 0.05
    assert top > 3000 and bottom < 700 and top > 5 * bottom
    assert picks["n00"] == 0  # the least free node loses every pairing
    assert len(picks) == 15  # but it is not herding: every other node gets some


def test_two_choices_prefers_less_loaded_at_equal_free():
    cands = [Candidate("busy", free=SLAB * 4, load=8.0), Candidate("idle", free=SLAB * 4, load=0.0)]
    assert [choose_targets(cands, 1, rng=random.Random(s))[0] for s in range(20)] == ["idle"] * 20


def test_domain_fallback_flags_and_warns(caplog):
    cands = [Candidate(f"n{i}", free=SLAB, failure_domain="rack0") for i in range(3)]
    p = choose_targets(cands, 2, rng=random.Random(0), need_bytes=SLAB)
    assert len(set(p)) == 2 and not p.domains_spread and not p.degraded
    assert "too few failure domains" in caplog.text


def test_existing_copies_push_new_ones_to_other_domains():
    cands = [Candidate("a1", SLAB * 9, failure_domain="A"), Candidate("a2", SLAB * 9, failure_domain="A"),
             Candidate("b1", SLAB, failure_domain="B")]
    for seed in range(20):
        assert list(choose_targets(cands, 1, rng=random.Random(seed), existing=["a1"])) == ["b1"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="r must be"):
        choose_targets([], 0, rng=random.Random(0))
    with pytest.raises(ValueError, match="listed twice"):
        choose_targets([Candidate("a", 1), Candidate("a", 2)], 1, rng=random.Random(0))
    cands = [Candidate("mem1", SLAB), Candidate("m", SLAB)]
    assert list(choose_targets(cands, 1, rng=random.Random(0), exclude="mem1")) == ["m"]  # a str is one name


# -- the seed's topologies -----------------------------------------------------------------


def test_symmetric_topology_never_places_on_self():
    names = [f"node{i}" for i in range(8)]  # RAMster's limit; every node requester and provider
    cands = [Candidate(n, free=8 * SLAB, load=i / 4) for i, n in enumerate(names)]
    rng = random.Random(5)
    for me in names:
        for _ in range(50):
            p = choose_targets(cands, 2, rng=rng, exclude=[me], need_bytes=SLAB)
            assert me not in p and len(set(p)) == 2
    two = cands[:2]  # the two-node symmetric cluster of the HOW-TO: each is the other's target
    assert list(choose_targets(two, 1, rng=rng, exclude=["node0"])) == ["node1"]
    assert list(choose_targets(two, 1, rng=rng, exclude=["node1"])) == ["node0"]


def test_ram_server_topology():
    server = [Candidate("ramserver", free=100 * SLAB)]
    for requester in ("node1", "node2"):
        assert list(choose_targets(server, 1, rng=random.Random(1), exclude=[requester], need_bytes=SLAB)) \
            == ["ramserver"]
        p = choose_targets(server, 2, rng=random.Random(1), exclude=[requester], need_bytes=SLAB, allow_degraded=True)
        assert list(p) == ["ramserver"] and p.degraded  # a second copy needs a second provider
        with pytest.raises(errors.StoreFullError):
            choose_targets(server, 2, rng=random.Random(1), exclude=[requester], need_bytes=SLAB)


# -- plans -------------------------------------------------------------------------------
