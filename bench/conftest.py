"""Fixtures of the benchmark suites (helpers in bench/figures.py)."""
from __future__ import annotations

import pytest

from figures import FigureClock


@pytest.fixture
def figure(benchmark):
    """``figure(measure, unit=..., rounds=3, setup=None, teardown=None)`` runs
    ``benchmark.pedantic`` over ``measure``, which returns one figure per round (called with
    setup's args, as pedantic does); the benchmark's statistics are of those figures, in
    ``unit`` (also in ``extra_info["unit"]``).  Returns their median."""

    def run(measure, *, unit: str, rounds: int = 3, setup=None, teardown=None):
        clock = FigureClock(unit)
        # pytest-benchmark has no public per-test timer; its runner reads this attribute
        benchmark._timer = clock

        def target(*args, **kwargs):
            clock.now += float(measure(*args, **kwargs))

        benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds, iterations=1)
        benchmark.extra_info["unit"] = unit
        return benchmark.stats.stats.median

    return run
