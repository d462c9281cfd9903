"""Token bucket on a fake clock: refill, burst cap, batching, delay, clock steps back."""
from __future__ import annotations

import pytest

from rram.control.ratelimit import TokenBucket


class FakeClock:
    def __init__(self):
        self.t = 50.0

    def __call__(self):
        return self.t


def test_starts_full_and_refills_at_rate():
    clock = FakeClock()
    b = TokenBucket(rate=100, burst=10, clock=clock)
    assert b.take_up_to(1000) == 10 and b.take_up_to(5) == 0
    clock.t += 0.125
    assert b.available() == 10  # 12.5 earned, capped at burst
    assert b.try_take(10) and not b.try_take(1)
    clock.t += 0.03125
    assert b.available() == pytest.approx(3.125) and b.take_up_to(8) == 3  # whole tokens only
    assert b.available() == pytest.approx(0.125)
    assert b.granted == 23


def test_long_run_throughput_matches_rate():
    clock = FakeClock()
    b = TokenBucket(rate=1000, burst=64, clock=clock, initial=0)
    moved = 0
    for _ in range(1000):  # a repatriation loop polling every 10 ms for batches of up to 256 pages
        clock.t += 0.01
        moved += b.take_up_to(256)
    assert 9990 <= moved <= 10000  # 10 s at 1000 pages/s


def test_delay_says_how_long_to_wait_and_takes_nothing():
    clock = FakeClock()
    b = TokenBucket(rate=4, burst=8, clock=clock, initial=0)
    assert b.delay(2) == 0.5 and b.available() == 0
    clock.t += 0.25
    assert b.delay(2) == 0.25
    clock.t += 0.25
    assert b.delay(2) == 0.0 and b.try_take(2)


def test_set_rate_keeps_earned_tokens():
    clock = FakeClock()
    b = TokenBucket(rate=2, burst=100, clock=clock, initial=0)
    clock.t += 1
    b.set_rate(10)  # 2 tokens earned at the old rate
    clock.t += 1
    assert b.available() == 12


def test_clock_stepping_back_earns_nothing():
    clock = FakeClock()
    b = TokenBucket(rate=10, burst=10, clock=clock, initial=0)
    clock.t -= 5
    assert b.available() == 0
    clock.t += 5.5  # back to the previous high-water mark + 0.5: only the 0.5 counts
    assert b.available() == 5


def test_bad_arguments():
    clock = FakeClock()
    for rate in (0, -1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ValueError, match="rate"):
            TokenBucket(rate=rate, burst=1, clock=clock)
    with pytest.raises(ValueError, match="initial"):
        TokenBucket(rate=1, burst=1, clock=clock, initial=2)
    b = TokenBucket(rate=1, burst=4, clock=clock)
    with pytest.raises(ValueError, match="never be available"):
        b.try_take(5)
    with pytest.raises(ValueError, match="negative"):
        b.take_up_to(-1)
