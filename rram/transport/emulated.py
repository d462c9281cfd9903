"""What the two software transports share: tcp (one-sided ops emulated by the provider's data
server) and loopback (the same executor called in-process).

Both run the C executors over ``rram._ext._regions`` region tables (bounds and key checks, GIL
released; tcp's wire protocol is ``rram._ext._tcpwire``), so both are usable exactly when those
extensions are built for this wire format, and both count a provider's work the same way.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

from .. import errors
from . import wire
from .base import OP_DTYPE

try:
    from .._ext import _regions, _tcpwire  # noqa: F401 - both must be built
except ImportError as exc:  # pragma: no cover - setup.py builds them unconditionally
    _tcpwire = None
    _IMPORT_ERROR = exc


def unavailable_reason() -> str | None:
    """None when the executor extension can serve this host, else a sentence saying why not."""
    if _tcpwire is None:
        return (f"rram._ext._regions or _tcpwire is not built ({_IMPORT_ERROR}); "
                "run `python setup.py build_ext --inplace`")
    if sys.byteorder != "little":
        return "the tcp data protocol is little-endian and this host is not"
    mismatch = {k: v for k, v in _tcpwire.WIRE_CONSTANTS.items() if _wire_value(k) != v}
    if mismatch:
        return f"rram._ext._tcpwire was built for other wire constants {mismatch}; rebuild it"
    return None


def _wire_value(name: str) -> int:
    return wire.HEADER.size if name == "HEADER" else getattr(wire, name)


def ops_bytes(ops: np.ndarray, max_batch: int) -> np.ndarray:
    """The uint8 view of a checked 1-D OP_DTYPE batch of 1..max_batch operations."""
    if not isinstance(ops, np.ndarray) or ops.dtype != OP_DTYPE or ops.ndim != 1:
        raise errors.TransportError("ops must be a 1-D numpy array of OP_DTYPE")
    if not 1 <= len(ops) <= max_batch:
        raise errors.TransportError(f"a batch holds 1..{max_batch} operations, got {len(ops)}")
    return np.ascontiguousarray(ops).view(np.uint8)


class ProviderStats:
    """A provider transport's counters.  tcp: totals of closed connections and of errors caught
    in Python; live connections count in C (``WireServer.counters``) and ``snapshot`` adds them
    in.  loopback: every batch, added as it runs."""

    FIELDS = ("ops", "batches", "bytes_read", "bytes_written", "errors")

    def __init__(self):
        self._lock = threading.Lock()
        self._c = [0] * len(self.FIELDS)

    def add(self, counts) -> None:
        """Add a tuple in FIELDS order."""
        with self._lock:
            self._c = [a + b for a, b in zip(self._c, counts)]

    def batch(self, ops: int, nread: int, nwritten: int, failed: bool) -> None:
        self.add((ops, 1, nread, nwritten, int(failed)))

    def error(self) -> None:
        with self._lock:
            self._c[-1] += 1

    def snapshot(self, live=()) -> dict:
        with self._lock:
            total = list(self._c)
        for counts in live:
            total = [a + b for a, b in zip(total, counts)]
        return dict(zip(self.FIELDS, total))
