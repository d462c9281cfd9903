"""What the benchmark suites share: the quick mode, and figures that are not durations.

``RRAM_BENCH_QUICK=1`` (``bench/report.py --quick``) shrinks sizes and rounds so that a suite
only proves it runs; its figures mean nothing.

pytest-benchmark times a function.  Some figures are not the duration of one call (bytes of
metadata a page, microseconds per fio I/O): ``FigureClock`` is a timer that moves only by the
figures added to it, so that the median and every statistic pytest-benchmark records (and
``--benchmark-json`` writes) are of the figure itself.  bench/conftest.py's ``figure`` fixture
wires it in.
"""
from __future__ import annotations

import os

QUICK = os.environ.get("RRAM_BENCH_QUICK") == "1"


def scaled(full: int, quick: int) -> int:
    """``full`` normally, ``quick`` under RRAM_BENCH_QUICK=1."""
    return quick if QUICK else full


class FigureClock:
    """A pytest-benchmark timer whose reading moves only by the figures added to it."""

    def __init__(self, unit: str):
        self.unit = unit
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def __repr__(self) -> str:  # pytest-benchmark writes the timer's name into its JSON
        return f"FigureClock({self.unit})"
