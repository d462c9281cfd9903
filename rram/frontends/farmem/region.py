"""Far memory for Python: a memory region whose pages live in rram and arrive on first touch.

    with FarMemory("cluster.yaml", size=8 << 30, budget=1 << 30) as mem:
        a = mem.array(np.float64, (1 << 30,))     # any numpy code, any thread, GIL held or not
        a[:] = 1.0; a.sum()
        f.readinto(mem)                           # kernel-mode faults are served too

A ``FarMemory`` *is* an ``mmap`` (buffer protocol, slicing, ``memoryview``) of a memfd,
registered with a userfaultfd that this process creates and hands, with the memfd, to a
handler process of its own (rram/frontends/farmem/handler.py) over a Unix socket.  The
handler has its own PageStore on the same cluster and keeps at most ``budget`` bytes of the
region resident.  No fault ever needs this process's GIL.

If the handler dies or its store fails, a C watchdog thread (ext/_uffd.pyx) makes the region
PROT_NONE and drops this process's userfaultfd: a thread blocked on a missing page (or the
next one to touch the region) gets SIGSEGV, and the fault reporter prints the region's name
and the reason before the previous SIGSEGV handler (faulthandler, or a core dump) runs.  A
system call given the region (``readinto``) fails with EFAULT instead.
"""
from __future__ import annotations

import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import warnings

import numpy as np

from ... import config as C
from ... import errors
from ..._ext import _uffd as U
from ...units import PAGE_SIZE
from . import wire as W

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 60.0    # the handler connects its store to every provider first
REQUEST_TIMEOUT = 30.0
#: the handler polls this long after serving a fault before it sleeps (0: never spins)
SPIN_US = 50
_NEEDED = {"MISSING_SHMEM": U.FEATURE_MISSING_SHMEM, "WP_HUGETLBFS_SHMEM": U.FEATURE_WP_SHMEM,
           "PAGEFAULT_FLAG_WP": U.FEATURE_PAGEFAULT_FLAG_WP}


def kernel_support() -> tuple[int, str, str]:
    """(offered features, how the fd is made, why better ways failed); raises when a feature
    FarMemory needs is missing, naming it and the kernel."""
    offered, how, why = U.probe_features()
    missing = [name for name, bit in _NEEDED.items() if not offered & bit]
    if missing:
        raise errors.RramError(f"FarMemory needs userfaultfd feature(s) {', '.join(missing)}, which kernel "
                               f"{os.uname().release} does not offer (shmem write-protect needs Linux >= 5.19)")
    return offered, how, why


def _config_for_handler(config):
    if isinstance(config, (str, os.PathLike)):
        return os.path.abspath(os.fspath(config))
    if isinstance(config, C.ClusterConfig):
        if config.source and os.path.exists(config.source):
            return os.path.abspath(config.source)
        raise errors.ConfigError("FarMemory: pass the cluster file's path (the handler process loads it)")
    raise TypeError(f"config: expected a path or a ClusterConfig, got {type(config).__name__}")


class FarMemory(mmap.mmap):
    """``size`` bytes backed by the page store of cluster ``config``; at most ``budget``
    bytes resident.  Pages never written read as zeros.  ``store`` options (local_budget,
    transport, replicas, ...) go to the handler's PageStore; ``spin_us``: see SPIN_US.
    With ``service`` (a socket path), a running far-memory service serves the region from
    its own store and budget instead of a handler process of its own (config None)."""

    def __new__(cls, config, size: int, budget: int, *, name: str | None = None, spin_us: int = SPIN_US,
                service: str | None = None, **store):
        size = -(-C.parse_size(size) // PAGE_SIZE) * PAGE_SIZE
        if size <= 0:
            raise errors.ConfigError(f"FarMemory: size must be positive, got {size}")
        memfd = os.memfd_create(f"rram-farmem-{name or ''}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, size)
            self = super().__new__(cls, memfd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(memfd)
            raise
        self._memfd = memfd
        self._watchdog = None
        self._sock = None
        self._proc = None
        self._lock = threading.Lock()
        return self

    def __init__(self, config, size: int, budget: int, *, name: str | None = None, spin_us: int = SPIN_US,
                 service: str | None = None, **store):
        self.name = name or f"farmem-{os.getpid()}-{id(self):x}"
        self.budget = C.parse_size(budget)
        self.spin_us = int(spin_us)
        if self.budget < 64 * PAGE_SIZE:
            self._teardown()
            raise errors.ConfigError(f"FarMemory: budget must be at least {64 * PAGE_SIZE} bytes, got {self.budget}")
        self.addr = np.frombuffer(self, dtype=np.uint8).ctypes.data
        if service is not None and (config is not None or store):
            self._teardown()
            raise errors.ConfigError("FarMemory: with service=, the service's cluster and store apply: "
                                     "pass config=None and no store options")
        try:
            self._open(None if service else _config_for_handler(config), store, service)
        except BaseException:
            self._teardown()
            raise

    def _open(self, config: str | None, store: dict, service: str | None) -> None:
        # 4 KiB faults only, and no copy of the mapping in a forked child (see _uffd's reporter)
        self.madvise(mmap.MADV_NOHUGEPAGE)
        self.madvise(mmap.MADV_DONTFORK)
        offered, self.uffd_from, why = kernel_support()
        self.kernel_faults = self.uffd_from != U.USER_MODE_ONLY
        if not self.kernel_faults:
            log.warning("FarMemory %s: only user-mode faults are served (%s): a system call given the region "
                        "(readinto, recv_into) fails with EFAULT on a missing page", self.name, why)
        self.prefetch_ok = bool(offered & U.FEATURE_MINOR_SHMEM)
        uffd, _, _ = U.open_uffd()
        lifeline_r = lifeline_w = -1
        try:
            want = sum(_NEEDED.values()) | (U.FEATURE_MINOR_SHMEM if self.prefetch_ok else 0)
            U.api(uffd, want)
            U.register(uffd, self.addr, len(self), U.MODE_MISSING | U.MODE_WP | (U.MODE_MINOR if self.prefetch_ok else 0))
            lifeline_r, lifeline_w = os.pipe()
            if service is None:
                self._spawn()
            else:
                self._connect(service)
            hello = {"op": "hello", "name": self.name, "config": config, "base": self.addr, "size": len(self),
                     "budget": self.budget, "minor": self.prefetch_ok, "spin_us": self.spin_us, "store": store}
            W.send(self._sock, hello, (uffd, self._memfd, lifeline_w))
            os.close(lifeline_w)  # only the handler may hold the write end: its death is our hang-up
            lifeline_w = -1
            U.install_fault_reporter()
            self._watchdog = U.Watchdog(lifeline_r, uffd, self.addr, len(self), self.name)
            uffd = lifeline_r = -1  # the watchdog owns them now
            reply = self._reply(HELLO_TIMEOUT)
            if not reply.get("ok"):
                raise errors.RramError(f"FarMemory {self.name}: handler could not start: {reply.get('error')}")
            self.handler_pid = reply["pid"]
        finally:
            for fd in (uffd, lifeline_r, lifeline_w):
                if fd >= 0:
                    os.close(fd)

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "rram.frontends.farmem.handler", "--fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._sock = ours
        self._reader = W.Reader(ours)

    def _connect(self, path: str) -> None:
        """Served by a running service (rram/frontends/farmem/service.py) instead."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise errors.RramError(f"FarMemory {self.name}: no far-memory service at {path}: {exc.strerror}") from None
        self._sock = sock
        self._reader = W.Reader(sock)

    def _reply(self, timeout: float) -> dict:
        self._sock.settimeout(timeout)
        try:
            msg, _ = self._reader.recv()
        except socket.timeout:
            raise errors.RramError(f"FarMemory {self.name}: no answer from its handler in {timeout:.0f} s") from None
        if msg is None:
            why = self._watchdog.reason if self._watchdog is not None and self._watchdog.failed else "it exited"
            raise errors.RramError(f"FarMemory {self.name}: lost its handler: {why}")
        return msg

    def _request(self, msg: dict) -> dict:
        with self._lock:  # one request at a time: the replies come back in order, unlabelled
            self._ensure_open()
            W.send(self._sock, msg)
            reply = self._reply(REQUEST_TIMEOUT)
        if not reply.get("ok"):
            raise errors.RramError(f"FarMemory {self.name}: {msg.get('op')}: {reply.get('error')}")
        return reply

    def _ensure_open(self) -> None:
        if self._sock is None:
            raise errors.RramError(f"FarMemory {self.name} is closed")
        if self._watchdog.failed:
            raise errors.RramError(f"FarMemory {self.name} failed: {self._watchdog.reason}")

    # -- the public surface -------------------------------------------------------------------

    def array(self, dtype, shape, offset: int = 0) -> np.ndarray:
        """A numpy array over the region (no copy) starting at byte ``offset``."""
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        count = int(np.prod(shape)) if shape else 1
        if offset < 0 or offset + count * dtype.itemsize > len(self):
            raise ValueError(f"array of {count} x {dtype} at offset {offset} does not fit in {len(self)} bytes")
        return np.frombuffer(self, dtype=dtype, count=count, offset=offset).reshape(shape)

    def prefetch(self, offset: int, length: int) -> int:
        """Fetch [offset, offset+length) ahead of use (up to half the budget); returns pages fetched."""
        return int(self._request({"op": "prefetch", "offset": int(offset), "length": int(length)})["pages"])

    def advise(self, advice: str) -> None:
        """``"sequential"``, ``"random"`` or ``"normal"``: steer the prefetcher."""
        self._request({"op": "advise", "advice": advice})

    def stats(self) -> dict:
        """The handler's counters (faults, prefetched, prefetch_hits, wasted, ...) and residency."""
        reply = self._request({"op": "stats"})
        return {**reply["counters"], "resident_pages": reply["resident"], "budget_pages": reply["budget_pages"],
                "prefetch_window": reply["window"]}

    @property
    def failure(self) -> str:
        """Why the region stopped serving ('' while it serves): set by the watchdog at once."""
        w = self._watchdog
        return w.reason if w is not None and w.failed else ""

    def resize(self, newsize):  # noqa: D102 - an mmap method that cannot apply
        raise errors.RramError("FarMemory regions cannot be resized")

    def close(self) -> None:
        """Stop the handler and unmap.  Views still alive afterwards fault with a message."""
        if self.closed:
            return
        self._teardown()

    def _teardown(self) -> None:
        with self._lock:  # after a request in flight; requests after this one find it closed
            watchdog, self._watchdog = self._watchdog, None
            if watchdog is not None:
                watchdog.retire("the region was closed")  # PROT_NONE: stale views fail loudly
            if self._sock is not None:
                try:
                    W.send(self._sock, {"op": "close"})
                    self._sock.settimeout(5.0)
                    self._reader.recv()
                except (OSError, errors.RramError):
                    pass
                self._sock.close()
                self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if watchdog is not None:
            watchdog.stop()
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
        try:
            super().close()
        except BufferError:  # the reporter keeps the region (PROT_NONE) and its reason
            warnings.warn(f"FarMemory {self.name} closed while views of it exist: using them now faults "
                          "with a message", ResourceWarning, stacklevel=3)
        else:
            if watchdog is not None:
                watchdog.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if not self.closed and getattr(self, "_sock", None) is not None:
            warnings.warn(f"unclosed FarMemory {self.name}", ResourceWarning, source=self)
            self.close()
