"""The far-memory handler's I/O threads (rram/frontends/farmem/iothread.py): batches run in
order on their own thread, the fault loop waits only for the batches it needs, and a failure
there is raised on the fault loop's thread instead of being lost."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from rram.frontends.farmem.iothread import IoThread


def test_batches_run_in_order_and_are_reaped_once():
    seen = []
    t = IoThread(lambda pages, arg: seen.append((int(pages[0]), arg)), "test-io")
    try:
        for k in range(5):
            t.submit(np.array([k, k + 100]), f"job{k}")
        assert t.inflight == 10
        done = t.wait(everything=True)
        assert [(int(p[0]), a) for p, a in done] == [(k, f"job{k}") for k in range(5)]
        assert seen == [(k, f"job{k}") for k in range(5)]
        assert t.inflight == 0 and t.reap() == []
    finally:
        t.close()


def test_wait_for_returns_once_the_batches_holding_the_pages_are_done():
    gate = threading.Event()

    def io(pages, arg):
        if arg == "slow":
            assert gate.wait(5)

    t = IoThread(io, "test-io")
    try:
        t.submit(np.array([1, 2, 3]), "fast")
        t.submit(np.array([7, 8]), "slow")
        done = t.wait_for(np.array([2]))  # the slow batch after it is not waited for
        assert [a for _, a in done] == ["fast"] and t.inflight == 2
        gate.set()
        assert [a for _, a in t.wait_for(np.array([8]))] == ["slow"]
    finally:
        gate.set()
        t.close()


def test_a_failure_is_raised_on_the_callers_thread():
    def io(pages, arg):
        raise OSError(5, "provider gone")

    t = IoThread(io, "test-io")
    try:
        t.submit(np.array([1]))
        with pytest.raises(RuntimeError, match="provider gone"):
            t.wait(everything=True)
        with pytest.raises(RuntimeError, match="provider gone"):
            t.submit(np.array([2]))
        with pytest.raises(RuntimeError):
            t.check()
    finally:
        t.close()  # idempotent, and quiet about the failure


def test_close_finishes_what_was_submitted():
    seen = []
    t = IoThread(lambda pages, arg: seen.append(int(pages[0])), "test-io")
    for k in range(3):
        t.submit(np.array([k]))
    t.close()
    t.close()
    assert seen == [0, 1, 2]
