"""The handler's I/O threads: the fetcher and the writer of a far-memory region.

umap's split of a handler into a fault loop, fillers and evictors.  The fault loop keeps the
policy and the page states; it hands batches of pages to an ``IoThread`` and reaps them when
done.  The fetcher reads prefetched pages from the store into a staging buffer and hands them
to the writer, which writes them into the memfd's page cache; the writer also does eviction:
it write-protects dirty victims, reads them through the handler's mapping, puts them to the
store and punches every victim out of the memfd.  (Page-cache writes and punches take the
memfd's inode lock: in two threads they spun on it.)  The I/O releases the GIL (ext/_uffd.pyx,
the store's C paths), so the three overlap: in a sequential scan the store read (network,
opening, decompression) runs beside the page-cache writes and punches of earlier batches.

Only the fault loop's thread changes page states: it marks a batch EVICTING or FETCHING when it
submits it, and ABSENT or CACHED when it reaps it.  A failure (the store lost its providers) is
raised again by the next ``submit``, ``reap`` or ``wait`` on the fault loop's thread, and so
reaches the faulting threads through the handler's lifeline as before.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable

import numpy as np


class IoThread:
    """Runs ``io(pages, arg)`` for each submitted batch, in order, on a thread of its own."""

    def __init__(self, io: Callable[[np.ndarray, Any], None], name: str):
        self._io = io
        self._cond = threading.Condition()
        self._todo: deque[tuple[np.ndarray, Any]] = deque()
        self._done: deque[tuple[np.ndarray, Any]] = deque()
        self._error: BaseException | None = None
        self._stop = False
        #: pages submitted and not reaped yet
        self.inflight = 0
        self._finished = 0  # batches done so far (they finish in the order submitted)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, pages: np.ndarray, arg: Any = None) -> None:
        with self._cond:
            self._raise()
            self._todo.append((pages, arg))
            self.inflight += len(pages)
            self._cond.notify_all()

    def reap(self) -> list[tuple[np.ndarray, Any]]:
        """The batches done since the last call, oldest first."""
        if not self._done and self._error is None:  # the common case, without the lock
            return []
        with self._cond:
            self._raise()
            out = list(self._done)
            self._done.clear()
            self.inflight -= sum(len(p) for p, _ in out)
            return out

    def wait(self, everything: bool = False) -> list[tuple[np.ndarray, Any]]:
        """Wait until a batch is done (``everything``: until none is left to do), then ``reap``."""
        with self._cond:
            while self._error is None and self._todo and (everything or not self._done):
                self._cond.wait(1.0)
        return self.reap()

    def wait_for(self, pages: np.ndarray) -> list[tuple[np.ndarray, Any]]:
        """Wait until no batch left to do holds one of ``pages``, then ``reap``."""
        pages = np.atleast_1d(pages)
        lo, hi = int(pages.min()), int(pages.max())

        def holds(batch: np.ndarray) -> bool:
            # the batches are runs of nearby pages: most are told apart by their bounds, without
            # np.isin (tens of µs a batch; a scan waits on its prefetch once a window)
            if not len(batch) or batch.min() > hi or batch.max() < lo:
                return False
            if len(batch) * len(pages) <= 4096:  # np.isin's set-up costs more than comparing all
                return bool((batch[:, None] == pages).any())
            return bool(np.isin(pages, batch).any())

        with self._cond:
            # the last batch holding one of them, by number: each wake-up then costs a compare
            last = max((j for j, (p, _) in enumerate(self._todo) if holds(p)), default=-1)
            target = self._finished + last + 1
            while self._error is None and self._finished < target:
                self._cond.wait(1.0)
        return self.reap()

    def close(self) -> None:
        """Finish what was submitted, then stop the thread (idempotent; errors are dropped)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def check(self) -> None:
        """Raise what failed on the thread, if anything did."""
        with self._cond:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"{self._thread.name}: {type(self._error).__name__}: {self._error}") from self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._todo and not self._stop:
                    self._cond.wait()
                if not self._todo:
                    return
                pages, arg = self._todo[0]
            try:
                self._io(pages, arg)
            except BaseException as exc:  # noqa: BLE001 - handed to the fault loop's thread
                with self._cond:
                    self._error = exc
                    self._todo.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._todo.popleft()
                self._finished += 1
                self._done.append((pages, arg))
                self._cond.notify_all()
