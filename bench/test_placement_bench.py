"""Placement cost and spread: power of two choices against "sort everyone, take the emptiest".

* choose_targets(r=2) over 32 providers in 8 racks, against a baseline that sorts all
  candidates by score and takes the best of each new rack (what a global greedy policy does).
* rereplication_plan for 4096 slabs after one rack of 4 dies.
* ``extra_info["max_share"]``: the largest fraction of 2000 placements one node received: the
  greedy baseline herds every slab onto the same emptiest nodes; two choices does not.

    .venv/bin/pytest bench/test_placement_bench.py --benchmark-columns=mean,stddev,rounds
"""
from __future__ import annotations

import random
from collections import Counter

from rram.control.placement import Candidate, choose_targets, rereplication_plan

SLAB = 64 << 20
CANDS = [Candidate(f"n{i:02d}", free=(8 + i % 5) * SLAB, load=(i % 3) / 2, failure_domain=f"rack{i % 8}")
         for i in range(32)]


def _greedy(cands, r):
    picks, racks = [], set()
    for c in sorted(cands, key=lambda c: -c.score):
        if c.domain not in racks:
            picks.append(c.name)
            racks.add(c.domain)
            if len(picks) == r:
                break
    return picks


def _share(choose):
    counts = Counter(n for _ in range(2000) for n in choose())
    return round(max(counts.values()) / 4000, 3)


def test_choose_two_choices(benchmark):
    rng = random.Random(1)
    benchmark.extra_info["max_share"] = _share(lambda: choose_targets(CANDS, 2, rng=rng, need_bytes=SLAB))
    benchmark(lambda: choose_targets(CANDS, 2, rng=rng, need_bytes=SLAB))


def test_choose_greedy_baseline(benchmark):
    benchmark.extra_info["max_share"] = _share(lambda: _greedy(CANDS, 2))
    benchmark(lambda: _greedy(CANDS, 2))


def test_rereplication_plan_4096_slabs(benchmark):
    rng = random.Random(2)
    names = [c.name for c in CANDS]
    slabs = {s: rng.sample(names, 2) for s in range(4096)}
    dead = {c.name for c in CANDS if c.failure_domain == "rack0"}
    big = [Candidate(c.name, 1000 * SLAB, c.load, c.failure_domain) for c in CANDS]
    plan = benchmark(lambda: rereplication_plan(slabs, dead, big, 2, rng=random.Random(3), slab_bytes=SLAB))
    benchmark.extra_info["moves"] = len(plan)
    assert not plan.unplaced  # (slabs whose both copies were in rack0 are lost, as they should be)
