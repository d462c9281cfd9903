"""Placement cost and spread: power of two choices against "sort everyone, take the emptiest".

* choose_targets(r=2) over 32 providers in 8 racks, against a baseline that sorts all
  candidates by score and takes the best of each new rack (what a global greedy policy does).
* ``extra_info["max_share"]``: the largest fraction of 2000 placements one node received: the
  greedy baseline herds every slab onto the same emptiest nodes; two choices does not.

    .venv/bin/pytest bench/test_placement_bench.py --benchmark-columns=mean,stddev,rounds
"""
from __future__ import annotations

import random
from collections import Counter

from rram.control.placement import Candidate, choose_targets

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
