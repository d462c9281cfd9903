"""Leap's majority-trend prefetcher over the fault stream of one far-memory region.

A history of the last 32 fault deltas (in pages); the trend is the Boyer–Moore majority of
the newest 8, else 16, else 32 deltas (a delta that fills more than half of the window).
With a trend, the next ``window`` pages along it are fetched in one batch.  The window
doubles (up to ``max_window``) on a fault the trend foresaw and on prefetched pages used,
and halves on a fault off the trend and on prefetched pages evicted unused.  ``advise("sequential")`` pins the trend to +1 and the window to its
maximum; ``advise("random")`` turns prediction off (hints with ``prefetch`` still work).
Any advice starts a new phase: the history of the last one is forgotten.
"""
from __future__ import annotations

from collections import deque
from itertools import islice

WINDOWS = (8, 16, 32)
HEAVY = WINDOWS[0] // 2 + 1
ADVICE = ("normal", "sequential", "random")


def majority(deltas) -> int | None:
    """The value filling more than half of ``deltas``, or None (Boyer–Moore vote + check)."""
    cand, count = 0, 0
    for d in deltas:
        if count == 0:
            cand, count = d, 1
        elif d == cand:
            count += 1
        else:
            count -= 1
    if count and sum(1 for d in deltas if d == cand) * 2 > len(deltas):
        return int(cand)
    return None


class Predictor:
    """Scalar Python on purpose: it runs once per demand fault, on at most 32 small ints."""

    def __init__(self, max_window: int = 64):
        self.history: deque[int] = deque(maxlen=WINDOWS[-1])
        self.last: int | None = None
        self.max_window = max(1, max_window)
        self.window = min(8, self.max_window)
        self.advice = "normal"
        self._trend: int | None = None
        # how often each delta occurs in the history, and how many deltas occur at least
        # HEAVY times: a majority of the smallest window needs that many, so while none does
        # (a random stream) the windows need not be counted at all
        self._counts: dict[int, int] = {}
        self._heavy = 0

    def advise(self, advice: str) -> None:
        if advice not in ADVICE:
            raise ValueError(f"advise: expected one of {', '.join(ADVICE)}, got {advice!r}")
        self.advice = advice
        # advice marks a new phase: a trend left over from the last one (the fill before
        # random reads, say) would only fetch pages in vain
        self.history.clear()
        self._counts.clear()
        self._heavy = 0
        self._trend = None
        if advice != "random":
            self.window = self.max_window if advice == "sequential" else max(1, self.window)

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
        return self._trend

    def _majority_trend(self) -> int | None:
        h = self.history
        for w in WINDOWS:
            if len(h) < w:
                break
            d = majority(list(islice(h, len(h) - w, None)))
            if d:
                return d
        return None

    def on_fault(self, page: int) -> None:
        """Record a demand fault at ``page``.  A fault the trend foresaw means we fetched too
        little (the window doubles); one off the trend, that we fetched in vain (it halves,
        down to nothing: random access then prefetches nothing until a trend holds again)."""
        if self.advice == "random":  # no prediction: nothing to record but the position
            self.last = page
            return
        if self.last is not None and page != self.last:
            delta = page - self.last
            if self._trend is not None and self.advice == "normal":
                self.window = min(self.max_window, max(1, self.window * 2)) if delta == self._trend else self.window // 2
            self._record(delta)
            self._trend = self._majority_trend() if self._heavy else None
        self.last = page

    def _record(self, delta: int) -> None:
        h, counts = self.history, self._counts
        if len(h) == h.maxlen:
            old = h[0]
            n = counts[old] - 1
            self._heavy -= n == HEAVY - 1
            if n:
                counts[old] = n
            else:
                del counts[old]
        h.append(delta)
        n = counts.get(delta, 0) + 1
        counts[delta] = n
        self._heavy += n == HEAVY

    def skip_to(self, page: int) -> None:
        """The stream moved on to ``page`` without faulting (pages mapped ahead of it)."""
        self.last = page

    def ahead(self, page: int, npages: int, depth: int = 1) -> list[int]:
        """The pages to fetch after ``page`` along the trend, ``depth`` windows (possibly none)."""
        d = self.trend()
        if not d or not self.window:
            return []
        return [p for p in range(page + d, page + d * (self.window * depth + 1), d) if 0 <= p < npages]
