"""A token bucket on an injected clock, for repatriation and drain throttling.

RAMster's "frontswap selfshrinking" brings remotified pages home slowly while the machine is
idle, so local RAM is used when it can be and a provider crash loses less.  "Slowly" is this
bucket: tokens (pages, or bytes for a drain) refill at ``rate`` per second up to ``burst``;
the repatriation loop asks for a batch and gets what the budget allows.  Sans-IO: it never
sleeps, it says how long to wait (``delay``), and the caller's loop decides how to wait.
"""
from __future__ import annotations

from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full unless ``initial`` says."""

    __slots__ = ("_clock", "_rate", "_burst", "_tokens", "_last", "granted")

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float], initial: float | None = None):
        self._clock = clock
        self._rate = _positive("rate", rate)
        self._burst = _positive("burst", burst)
        start = self._burst if initial is None else float(initial)
        if not 0 <= start <= self._burst:
            raise ValueError(f"initial tokens must be between 0 and burst ({self._burst}), got {initial!r}")
        self._tokens = start
        self._last = clock()
        self.granted = 0.0  # total tokens handed out: for status output

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def set_rate(self, rate: float) -> None:
        """Change the refill rate from now on (tokens earned so far are kept)."""
        self._refill()
        self._rate = _positive("rate", rate)

    def available(self) -> float:
        self._refill()
        return self._tokens

    def try_take(self, n: float = 1) -> bool:
        """Take ``n`` tokens if they are all there; otherwise take none."""
        self._check(n)
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            self.granted += n
            return True
        return False

    def take_up_to(self, n: int) -> int:
        """Take as many whole tokens as are available, at most ``n``; the batch size to use now."""
        if n < 0:
            raise ValueError(f"cannot take a negative number of tokens ({n})")
        self._refill()
        k = min(int(n), int(self._tokens))
        self._tokens -= k
        self.granted += k
        return k

    def delay(self, n: float = 1) -> float:
        """Seconds until ``n`` tokens will be available (0.0 if they are now); takes nothing."""
        self._check(n)
        self._refill()
        missing = n - self._tokens
        return 0.0 if missing <= 0 else missing / self._rate

    def _check(self, n: float) -> None:
        if n < 0:
            raise ValueError(f"cannot take a negative number of tokens ({n})")
        if n > self._burst:
            raise ValueError(f"{n} tokens can never be available at once: burst is {self._burst}")

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        if elapsed > 0:  # a clock that steps back earns nothing and does not go into debt
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._last = max(now, self._last)

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self._rate}, burst={self._burst}, tokens={self._tokens:.3f})"


def _positive(what: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)
