"""Leap's majority-trend prefetcher over the fault stream of one far-memory region.

A history of the last 32 fault deltas (in pages); the trend is the Boyer–Moore majority of
the newest 8, else 16, else 32 deltas (a delta that fills more than half of the window).
With a trend, the next ``window`` pages along it are fetched in one batch; the window
doubles (up to ``max_window``) while prefetched pages are used and halves when they are
evicted unused.  ``advise("sequential")`` pins the trend to +1 and the window to its
maximum; ``advise("random")`` turns prediction off (hints with ``prefetch`` still work).
"""
from __future__ import annotations

import numpy as np

WINDOWS = (8, 16, 32)
ADVICE = ("normal", "sequential", "random")


def majority(deltas: np.ndarray) -> int | None:
    """The value filling more than half of ``deltas``, or None (Boyer–Moore vote + check)."""
    cand, count = 0, 0
    for d in deltas.tolist():
        if count == 0:
            cand, count = d, 1
        elif d == cand:
            count += 1
        else:
            count -= 1
    if count and int((deltas == cand).sum()) * 2 > len(deltas):
        return cand
    return None


class Predictor:
    def __init__(self, max_window: int = 64):
        self.history = np.zeros(WINDOWS[-1], dtype=np.int64)
        self.n = 0
        self.last: int | None = None
        self.max_window = max(1, max_window)
        self.window = min(8, self.max_window)
        self.advice = "normal"

    def advise(self, advice: str) -> None:
        if advice not in ADVICE:
            raise ValueError(f"advise: expected one of {', '.join(ADVICE)}, got {advice!r}")
        self.advice = advice
        if advice == "sequential":
            self.window = self.max_window

    def feedback(self, used: int, wasted: int) -> None:
        """Grow the window while prefetched pages are used, shrink it when they are not."""
        if self.advice == "sequential":
            return
        if used and not wasted:
            self.window = min(self.max_window, self.window * 2)
        elif wasted > used:
            self.window = max(1, self.window // 2)

    def trend(self) -> int | None:
        if self.advice == "sequential":
            return 1
        if self.advice == "random":
            return None
        for w in WINDOWS:
            if self.n < w:
                break
            d = majority(self.history[(self.n - w + np.arange(w)) % WINDOWS[-1]])
            if d:
                return d
        return None

    def on_fault(self, page: int) -> int | None:
        """Record a demand fault at ``page``; the trend delta, or None."""
        if self.last is not None and page != self.last:
            self.history[self.n % WINDOWS[-1]] = page - self.last
            self.n += 1
        self.last = page
        return self.trend()

    def ahead(self, page: int, npages: int) -> np.ndarray:
        """The pages to fetch after a demand fault at ``page`` (possibly none)."""
        d = self.trend()
        if not d:
            return np.zeros(0, dtype=np.int64)
        pages = page + d * np.arange(1, self.window + 1, dtype=np.int64)
        return pages[(pages >= 0) & (pages < npages)]
