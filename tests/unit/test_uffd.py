"""ext/_uffd.pyx on its own: faults taken by a system call (GIL released) in a thread of
this process, served by the main thread with the extension's calls."""
from __future__ import annotations

import mmap
import os
import threading

import numpy as np
import pytest

from rram._ext import _uffd as U

PAGE = U.PAGE_SIZE
N = 16


def _features():
    try:
        return U.probe_features()
    except OSError as exc:
        pytest.skip(f"no userfaultfd here: {exc}")


@pytest.fixture
def shm():
    """A registered memfd mapping: (uffd, memfd, mmap, address)."""
    offered, how, _ = _features()
    if not offered & U.FEATURE_MISSING_SHMEM or how == U.USER_MODE_ONLY:
        pytest.skip(f"needs MISSING_SHMEM and kernel-mode faults (offered {offered:#x}, fd from {how})")
    memfd = os.memfd_create("uffd-test", os.MFD_CLOEXEC)
    os.ftruncate(memfd, N * PAGE)
    m = mmap.mmap(memfd, N * PAGE, mmap.MAP_SHARED)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
    uffd, _, _ = U.open_uffd()
    U.api(uffd, U.FEATURE_MISSING_SHMEM | (offered & (U.FEATURE_WP_SHMEM | U.FEATURE_PAGEFAULT_FLAG_WP)))
    wp = U.MODE_WP if offered & U.FEATURE_WP_SHMEM else 0
    U.register(uffd, addr, N * PAGE, U.MODE_MISSING | wp)
    yield uffd, memfd, m, addr
    os.close(uffd)
    m.close()
    os.close(memfd)


def _read_into(m, offset: int, data: bytes):
    """A thread reading ``data`` from a pipe into the region (a kernel-mode fault, no GIL)."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    view = memoryview(m)[offset:offset + len(data)]
    t = threading.Thread(target=lambda: (os.readv(r, [view]), view.release(), os.close(r)))
    t.start()
    return t


def _one_fault(uffd):
    addrs, flags = np.zeros(8, np.uint64), np.zeros(8, np.uint64)
    n, _ = U.read_faults(uffd, addrs, flags, 5000)
    assert n >= 1
    return int(addrs[0]), int(flags[0])


def test_kernel_mode_fault_served_by_copy_then_punched_and_served_again(shm):
    uffd, memfd, m, addr = shm
    t = _read_into(m, 3 * PAGE + 100, b"hello")
    fault, flags = _one_fault(uffd)
    assert fault == addr + 3 * PAGE and flags & U.FLAG_WRITE
    src = np.full(2 * PAGE, 0xAB, dtype=np.uint8)
    dsts = np.array([addr + 3 * PAGE, addr + 4 * PAGE], dtype=np.uint64)
    assert U.copy_pages(uffd, dsts, src.ctypes.data, 2, False) == 2
    t.join(5)
    assert not t.is_alive()
    assert m[3 * PAGE + 100:3 * PAGE + 105] == b"hello" and m[3 * PAGE] == 0xAB and m[5 * PAGE - 1] == 0xAB
    # copying a present page again is skipped, not an error
    assert U.copy_pages(uffd, dsts, src.ctypes.data, 2, False) == 0
    U.punch_pages(memfd, np.array([3 * PAGE], dtype=np.uint64), 1)
    t = _read_into(m, 3 * PAGE, b"again")
    assert _one_fault(uffd)[0] == addr + 3 * PAGE
    U.zeropage(uffd, addr + 3 * PAGE, PAGE)
    t.join(5)
    assert m[3 * PAGE:3 * PAGE + 6] == b"again\0" and m[4 * PAGE] == 0xAB


def test_write_protect_turns_a_write_into_a_wp_fault(shm):
    uffd, memfd, m, addr = shm
    offered, _, _ = _features()
    if not offered & U.FEATURE_WP_SHMEM:
        pytest.skip("no write-protect on shmem (UFFD_FEATURE_WP_HUGETLBFS_SHMEM)")
    src = np.zeros(PAGE, dtype=np.uint8)
    page = np.array([addr], dtype=np.uint64)
    U.copy_pages(uffd, page, src.ctypes.data, 1, True)   # mapped write-protected
    assert m[0] == 0
    t = _read_into(m, 0, b"w")
    fault, flags = _one_fault(uffd)
    assert fault == addr and flags & U.FLAG_WP
    U.writeprotect_pages(uffd, page, 1, False)           # un-protect wakes the writer
    t.join(5)
    assert m[0:1] == b"w"
    buf = np.zeros(PAGE, dtype=np.uint8)
    U.gather_pages(addr, np.zeros(1, dtype=np.uint64), 1, buf.ctypes.data)
    assert bytes(buf[:1]) == b"w"


def test_errors_carry_the_errno():
    with pytest.raises(OSError) as exc:
        U.register(-1, 0, PAGE, U.MODE_MISSING)
    assert exc.value.errno and "UFFDIO_REGISTER" in str(exc.value)
