"""Swap devices on this host, one at a time, for benchmarks that compare them on equal terms.

    with swap_device("rram", workdir, pin=pin_to_server_cpu) as dev:   # dev is active swap
        ...                                                          # then swapoff, teardown

* ``zram``   /dev/zram0 with lz4: in-kernel compressed RAM
* ``disk``   a swap file on the root file system
* ``nbdkit`` ``nbdkit memory`` (C, local RAM) -> nbdfuse -> loop: the floor of the NBD path
* ``rram``   two tcp providers + ``rram requester`` (4 MiB local budget) -> nbdfuse -> loop

The host has no kernel NBD client, so both NBD servers sit behind the same nbdfuse + loop path:
their difference is the servers' own.  ``pin(pid)`` is called for every user-space server
process (providers, requester, nbdkit, nbdfuse), so a benchmark can keep them off its
workload's CPU.  ``Unavailable`` says why a device cannot be had here (the caller skips).

In the soft-RoCE guest (bench/vm), ``guest_swap_device`` gives zram, the guest's scratch disk
and ``nbdkit memory`` behind the kernel's own NBD client (``nbd-client -swap`` on /dev/nbd0).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator

from .cluster import LocalCluster
from .swapload import FuseLoopSwap, sh, start_requester, stop_process, swaps, wait_for_path

DEVICES = ("zram", "disk", "nbdkit", "rram")


class Unavailable(Exception):
    """This device cannot be set up on this host; the message says why."""


def reason() -> str | None:
    """Why no swap device can be compared here, or None."""
    if os.geteuid() != 0:
        return "needs root (swapon, loop devices, cgroups)"
    if swaps():
        return f"another swap is active ({swaps()}): results would mix devices"
    return None


@contextlib.contextmanager
def swap_device(name: str, size: int, pin: Callable[[int], None] = lambda pid: None,
                servers: list[int] | None = None, requester_args: tuple[str, ...] = ()) -> Iterator[str]:
    """``name`` as active swap of ``size`` bytes; yields its path.  ``servers`` (if given)
    receives the pids of the user-space processes serving it, for CPU accounting;
    ``requester_args``: more options of `rram requester` (``rram`` only)."""
    servers = [] if servers is None else servers
    setup = {"zram": _zram, "disk": _disk, "nbdkit": _nbdkit,
             "rram": lambda *a: _rram(*a, requester_args=requester_args)}[name]
    with setup(size, pin, servers) as dev:
        yield dev


@contextlib.contextmanager
def _zram(size, pin, servers):
    dev = "/dev/zram0"
    try:
        with open("/sys/block/zram0/disksize") as f:
            in_use = f.read().strip() != "0"
    except OSError:
        in_use = True
    if not os.path.exists(dev) or in_use:
        raise Unavailable("/dev/zram0 is missing or in use")
    try:
        with open("/sys/block/zram0/comp_algorithm", "w") as f:
            f.write("lz4")
    except OSError:
        pass  # keep the kernel's default algorithm
    with open("/sys/block/zram0/disksize", "w") as f:
        f.write(str(size))
    try:
        sh("mkswap", dev)
        sh("swapon", dev)
        yield dev
    finally:
        sh("swapoff", dev, check=False, timeout=300)
        with open("/sys/block/zram0/reset", "w") as f:
            f.write("1")


@contextlib.contextmanager
def _disk(size, pin, servers):
    tmp = tempfile.mkdtemp(prefix="rram-swapfile-", dir="/var/tmp")
    path = os.path.join(tmp, "swapfile")
    try:
        sh("dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size >> 20}", "status=none")
        os.chmod(path, 0o600)
        sh("mkswap", path)
        if sh("swapon", path, check=False).returncode:
            raise Unavailable(f"the file system under {tmp} cannot hold a swap file")
        yield path
    finally:
        if path in swaps():
            sh("swapoff", path, timeout=300)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _fuse_swap(sock: str, tmp: str, server: subprocess.Popen, pin, servers):
    """Swap on the NBD server at ``sock`` through nbdfuse and a loop device; stops ``server``
    afterwards unless the device could not stop being swap (its pages would be lost)."""
    swap = None
    try:
        swap = FuseLoopSwap(["--unix", sock], tmp)
        pin(swap._fuse.pid)
        servers.append(swap._fuse.pid)
        yield swap.loop
    finally:
        errors = swap.close() if swap is not None else []
        if swap is None or not swap.active:
            stop_process(server)
        if errors:
            raise RuntimeError(f"swap teardown: {errors}")


def rram_cluster(size: int, workdir: str | None = None) -> LocalCluster:
    """The providers behind rram's swap device of ``size`` bytes: two tcp providers, the cluster's
    default replicas, and a cluster file giving requesters 4 MiB of local compressed pages.
    Whatever is compared with swap on rram (FarMemory) runs on this same configuration."""
    return LocalCluster(n_providers=2, capacity=f"{2 * size >> 20}MiB", transport="tcp", workdir=workdir,
                        slab_size="4MiB", verbose=False, requester={"local_budget": "4MiB"})


def _need_fuse_loop() -> None:
    """The host route to an NBD server as swap: nbdfuse, /dev/fuse and losetup."""
    missing = [what for what, ok in (("nbdfuse", shutil.which("nbdfuse")), ("/dev/fuse", os.path.exists("/dev/fuse")),
                                     ("losetup", shutil.which("losetup"))) if not ok]
    if missing:
        raise Unavailable(f"swap on an NBD server here goes through nbdfuse + a loop device; missing: "
                          f"{', '.join(missing)}")


@contextlib.contextmanager
def _rram(size, pin, servers, requester_args: tuple[str, ...] = ()):
    _need_fuse_loop()
    tmp = tempfile.mkdtemp(prefix="rram-swap-")
    try:
        with rram_cluster(size, tmp) as cluster:
            for proc in cluster.procs.values():
                pin(proc.pid)
                servers.append(proc.pid)
            sock = os.path.join(tmp, "nbd.sock")
            requester, _ = start_requester(cluster.config_path, "req", size, sock,
                                           os.path.join(tmp, "requester.log"), extra_args=requester_args)
            pin(requester.pid)
            servers.append(requester.pid)
            with _fuse_swap(sock, tmp, requester, pin, servers) as loop:
                yield loop
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _nbdkit(size, pin, servers):
    if shutil.which("nbdkit") is None:
        raise Unavailable("nbdkit is not installed")
    _need_fuse_loop()
    tmp = tempfile.mkdtemp(prefix="rram-swap-nbdkit-")
    sock = os.path.join(tmp, "nbdkit.sock")
    server = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", str(size)], stdin=subprocess.DEVNULL)
    try:
        try:
            wait_for_path(sock, server)
        except BaseException:
            stop_process(server)
            raise
        pin(server.pid)
        servers.append(server.pid)
        with _fuse_swap(sock, tmp, server, pin, servers) as loop:
            yield loop
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: the soft-RoCE guest's blank scratch disk (scripts/rxe-vm/run with RXE_DISK_MB)
SCRATCH_DISK, SCRATCH_SERIAL = "/dev/vda", "rram-scratch"


def scratch_disk_reason() -> str | None:
    """Why SCRATCH_DISK may not be made swap here, or None.  Only the guest's scratch disk,
    known by its serial, qualifies: on a host /dev/vda is often the root disk."""
    try:
        with open(f"/sys/block/{os.path.basename(SCRATCH_DISK)}/serial") as f:
            serial = f.read().strip()
    except OSError:
        serial = None
    if serial != SCRATCH_SERIAL:
        return (f"{SCRATCH_DISK} is not the VM's scratch disk (serial {serial!r}, want {SCRATCH_SERIAL!r}: "
                "scripts/bench-vm.sh attaches it)")
    return None


# -- in the soft-RoCE guest (bench/vm): the kernel's own NBD client, the scratch disk --------

NBD_DEV = "/dev/nbd0"
GUEST_DEVICES = ("zram", "disk", "nbdkit")


@contextlib.contextmanager
def guest_swap_device(name: str, size: int, pin: Callable[[int], None] = lambda pid: None,
                      servers: list[int] | None = None) -> Iterator[str]:
    """In the guest, ``name`` of GUEST_DEVICES as active swap of ``size`` bytes: zram, the
    scratch disk (the whole device), or `nbdkit memory` behind ``nbd-client -swap`` on NBD_DEV
    (the floor of the kernel's NBD path).  As ``swap_device``; rram's own case is the guest
    test stack (tests/vm/test_nbd_swap.py)."""
    servers = [] if servers is None else servers
    setup = {"zram": _guest_zram, "disk": _scratch_disk, "nbdkit": _nbdkit_nbd}[name]
    with setup(size, pin, servers) as dev:
        yield dev


@contextlib.contextmanager
def _guest_zram(size, pin, servers):
    subprocess.run(["modprobe", "zram", "num_devices=1"], capture_output=True)  # no udev in the guest
    with _zram(size, pin, servers) as dev:
        yield dev


@contextlib.contextmanager
def _scratch_disk(size, pin, servers):
    subprocess.run(["modprobe", "virtio_blk"], capture_output=True)
    why = scratch_disk_reason()
    if why:
        raise Unavailable(why)
    try:
        sh("mkswap", SCRATCH_DISK)
        sh("swapon", SCRATCH_DISK)
        yield SCRATCH_DISK
    finally:
        sh("swapoff", SCRATCH_DISK, check=False, timeout=300)


@contextlib.contextmanager
def _nbdkit_nbd(size, pin, servers):
    if not os.path.exists(NBD_DEV):
        subprocess.run(["modprobe", "nbd", "nbds_max=4"], capture_output=True)
    for need, why in ((os.path.exists(NBD_DEV), f"{NBD_DEV} is missing: no kernel NBD client here"),
                      (shutil.which("nbd-client"), "nbd-client is not installed"),
                      (shutil.which("nbdkit"), "nbdkit is not installed")):
        if not need:
            raise Unavailable(why)
    tmp = tempfile.mkdtemp(prefix="rram-nbdkit-nbd-")
    sock = os.path.join(tmp, "nbdkit.sock")
    server = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", str(size)], stdin=subprocess.DEVNULL)
    attached = False
    try:
        wait_for_path(sock, server)
        pin(server.pid)
        servers.append(server.pid)
        sh("nbd-client", "-unix", sock, NBD_DEV, "-b", "4096", "-swap", timeout=30)
        attached = True
        sh("mkswap", NBD_DEV)
        sh("swapon", NBD_DEV)
        yield NBD_DEV
    finally:
        if NBD_DEV in swaps():
            sh("swapoff", NBD_DEV, check=False, timeout=300)
        if attached:  # pages of a device still in use must not lose their server
            sh("nbd-client", "-d", NBD_DEV, check=False, timeout=30)
        if not attached or NBD_DEV not in swaps():
            stop_process(server)
        shutil.rmtree(tmp, ignore_errors=True)


def process_role(pid: int) -> str:
    """What a serving process is, to report CPU per kind: nbdfuse, nbdkit, the rram requester,
    a provider, else its program's name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "gone"
    words = " ".join(a.decode(errors="replace") for a in argv)
    for role in ("nbdfuse", "nbdkit", "requester", "provider"):
        if role in words:
            return role
    return os.path.basename(argv[0].decode(errors="replace"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads) so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
