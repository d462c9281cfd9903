"""The majority-trend predictor (rram/frontends/farmem/prefetch.py)."""
from __future__ import annotations

import numpy as np
import pytest

from rram.frontends.farmem.prefetch import Predictor, majority


def test_majority_needs_more_than_half():
    assert majority(np.array([1, 1, 2, 1, 3])) == 1
    assert majority(np.array([1, 2, 1, 2])) is None
    assert majority(np.array([5])) == 5


def test_sequential_and_strided_streams_have_a_trend():
    p = Predictor(max_window=16)
    for page in range(0, 40, 3):
        p.on_fault(page)
    assert p.trend() == 3
    assert p.ahead(39, 1000)[:3] == [42, 45, 48]
    assert p.ahead(999, 1000) == []  # never past the region
    p.skip_to(100)                     # pages mapped ahead: no delta recorded
    p.on_fault(103)
    assert p.trend() == 3


def test_noise_within_the_window_keeps_the_trend_and_random_has_none():
    p = Predictor()
    pages = list(range(100, 120))
    pages[5] = 7  # one stray fault
    for page in pages:
        p.on_fault(page)
    assert p.trend() == 1
    q = Predictor()
    for page in np.random.default_rng(0).integers(0, 1 << 20, 64).tolist():
        q.on_fault(page)
    assert q.trend() is None and q.ahead(5, 100) == []


def test_window_adapts_and_advice_overrides():
    p = Predictor(max_window=32)
    w = p.window
    p.feedback(used=8, wasted=0)
    assert p.window == 2 * w
    p.feedback(used=0, wasted=8)
    assert p.window == w
    p.advise("random")
    for page in range(20):
        p.on_fault(page)
    assert p.trend() is None
    p.advise("sequential")
    assert p.trend() == 1 and p.window == 32
    with pytest.raises(ValueError, match="sideways"):
        p.advise("sideways")


def test_random_faults_after_a_scan_shrink_the_window_to_nothing():
    p = Predictor(max_window=64)
    for page in range(100):
        p.on_fault(page)
    assert p.trend() == 1 and p.window == 64
    for page in np.random.default_rng(1).integers(1000, 1 << 20, 12).tolist():
        p.on_fault(page)
    assert p.window == 0 and p.ahead(5, 100) == []


def test_advice_forgets_the_trend_of_the_last_phase():
    """A region filled in order and then read at random must not prefetch along the fill."""
    p = Predictor(max_window=64)
    p.advise("random")
    for page in range(100):
        p.on_fault(page)
    p.advise("normal")
    assert p.trend() is None and p.ahead(100, 1000) == []
    for page in range(200, 300):
        p.on_fault(page)
    assert p.trend() == 1
    p.advise("normal")
    assert p.trend() is None
