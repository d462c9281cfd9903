"""A swap-bound workload that checks every page, and a memory limit to run it under.

    python -m rram.testing.swapload --mib 96 --passes 2 [--cgroup DIR] [--hold]

Maps ``--mib`` MiB of anonymous memory and fills every 4 KiB page with a pattern derived from
(seed, pass, page index): its first half pseudo-random, its second half the page's tag
repeated, so that a page compresses about 2:1 like real process memory and any misplaced,
stale or torn page is caught.  Pass 0 writes every page in order; each later pass visits the
pages in a random order of 1 MiB chunks, checks the previous pass's pattern and writes its
own; a final pass checks.  Prints one JSON line: bad pages, seconds per pass, pswpin/pswpout
deltas.  Exit status 0 only when no page was bad.  ``--hold`` waits for stdin to close before
the final check (a test can act on the swap device while pages sit in it).

A memory limit far below the working set makes the kernel swap this process alone, which is
how to test swap on a userspace block server without deadlocking the machine: the server
runs outside the limit.  ``MemoryLimit`` makes a child cgroup with that limit: cgroup v2
(``memory.max``) where the memory controller is on the unified hierarchy (mounting one at a
private mount point if none is mounted), else cgroup v1 (``memory.limit_in_bytes``) under
this process's own memory cgroup.  Its ``reason`` says why none could be made.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

PAGE = 4096
WORDS = PAGE // 8
CHUNK_PAGES = 256  # pages checked/written per numpy call: 1 MiB of temporaries at most
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def pattern(seed: int, version: int, first: int, n: int) -> np.ndarray:
    """The expected contents of pages [first, first+n) in pass ``version``: (n, 512) uint64."""
    tag = (np.uint64(seed & 0xFFFF) << np.uint64(48)) | (np.uint64(version & 0xFFFF) << np.uint64(32)) \
        | np.arange(first, first + n, dtype=np.uint64)
    out = np.empty((n, WORDS), dtype=np.uint64)
    half = WORDS // 2
    with np.errstate(over="ignore"):
        out[:, :half] = _splitmix(tag[:, None] * np.uint64(WORDS) + np.arange(half, dtype=np.uint64))
    out[:, half:] = tag[:, None]
    return out


def vmstat() -> dict[str, int]:
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def run(mib: int, passes: int = 1, seed: int = 1, hold: bool = False) -> dict:
    """Run the workload in this process; returns the summary (``bad_pages`` must be 0)."""
    import mmap

    pages = (mib << 20) // PAGE
    m = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem = np.frombuffer(m, dtype=np.uint64).reshape(pages, WORDS)
    rng = np.random.default_rng(seed)
    chunks = np.arange(0, pages, CHUNK_PAGES)
    before = vmstat()
    t0 = time.monotonic()
    bad = 0
    first_bad = None
    times = []

    def check(first: int, n: int, version: int) -> None:
        nonlocal bad, first_bad
        wrong = np.flatnonzero((mem[first:first + n] != pattern(seed, version, first, n)).any(axis=1))
        if len(wrong):
            bad += len(wrong)
            first_bad = first_bad if first_bad is not None else first + int(wrong[0])

    for version in range(passes):
        t = time.monotonic()
        order = chunks if version == 0 else rng.permutation(chunks)
        for first in order.tolist():
            n = min(CHUNK_PAGES, pages - first)
            if version:
                check(first, n, version - 1)
            mem[first:first + n] = pattern(seed, version, first, n)
        times.append(round(time.monotonic() - t, 3))
    if hold:
        print(json.dumps({"holding": True, "pages": pages}), flush=True)
        sys.stdin.read()
    t = time.monotonic()
    for first in rng.permutation(chunks).tolist():
        check(first, min(CHUNK_PAGES, pages - first), passes - 1)
    times.append(round(time.monotonic() - t, 3))
    after = vmstat()
    mem = None  # drop the view before unmapping
    m.close()
    return {"mib": mib, "pages": pages, "passes": passes, "bad_pages": bad, "first_bad_page": first_bad,
            "pass_seconds": times, "seconds": round(time.monotonic() - t0, 3),
            "pswpout": after["pswpout"] - before["pswpout"], "pswpin": after["pswpin"] - before["pswpin"]}


# -- memory limits -------------------------------------------------------------------------------

class MemoryLimit:
    """A child cgroup whose memory limit is ``limit`` bytes; ``enter`` moves a process into it.

    ``MemoryLimit.make(limit)`` returns one, or None with ``MemoryLimit.reason`` set.  ``close``
    kills what is left inside and removes the cgroup (and a private mount); idempotent.

    ``throttle=True`` makes ``limit`` memory.high (cgroup v2 only): above it the kernel reclaims
    and throttles the workload but never OOM-kills it.  A hard memory.max OOM-kills a workload
    whose swap-out stalls for a few hundred milliseconds (memcg reclaim gives up after a few
    writeback throttles), which is the kernel's policy, not a lost page: tests of failures
    that are allowed to stall swap for up to the suspect threshold use ``throttle``.
    """

    reason: str | None = None

    def __init__(self, path: str, version: int, mount: str | None = None):
        self.path, self.version, self._mount = path, version, mount

    @classmethod
    def make(cls, limit: int, name: str = "rram-swapload", throttle: bool = False) -> "MemoryLimit | None":
        name = f"{name}-{os.getpid()}"
        if os.geteuid() != 0:
            cls.reason = "making a cgroup needs root"
            return None
        v2, mount = cls._v2_root()
        if v2:
            path = os.path.join(v2, name)
            try:
                os.mkdir(path)
                _write(os.path.join(path, "memory.high" if throttle else "memory.max"), str(limit))
                _write(os.path.join(path, "memory.swap.max"), "max")
                return cls(path, 2, mount)
            except OSError as exc:
                cls._cleanup_dir(path)
                cls._umount(mount)
                cls.reason = f"cgroup v2 at {v2}: {exc}"
                return None
        cls._umount(mount)
        if throttle:
            cls.reason = "memory.high (throttle without OOM kills) needs cgroup v2 with the memory controller"
            return None
        v1 = cls._v1_own()
        if v1 is None:
            cls.reason = "no cgroup with a memory controller: neither cgroup v2 (memory) nor v1 memory is available"
            return None
        path = os.path.join(v1, name)
        try:
            os.mkdir(path)
            _write(os.path.join(path, "memory.limit_in_bytes"), str(limit))
            return cls(path, 1)
        except OSError as exc:
            cls._cleanup_dir(path)
            cls.reason = f"cgroup v1 memory at {v1}: {exc}"
            return None

    @staticmethod
    def _v2_root() -> tuple[str | None, str | None]:
        """A cgroup v2 directory whose children can have the memory controller, and our private mount."""
        mounts = []
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, where, fstype = line.split()[:3]
                if fstype == "cgroup2":
                    mounts.append(where.replace("\\040", " "))
        mount = None
        if not mounts:
            mount = tempfile.mkdtemp(prefix="rram-cg2-")
            if subprocess.run(["mount", "-t", "cgroup2", "none", mount], capture_output=True).returncode:
                os.rmdir(mount)
                return None, None
            mounts = [mount]
        for root in mounts:
            try:
                with open(os.path.join(root, "cgroup.controllers")) as f:
                    if "memory" not in f.read().split():
                        continue
                with open(os.path.join(root, "cgroup.subtree_control")) as f:
                    if "memory" not in f.read().split():
                        _write(os.path.join(root, "cgroup.subtree_control"), "+memory")
                return root, mount
            except OSError:
                continue
        return None, mount

    @staticmethod
    def _v1_own() -> str | None:
        """This process's own cgroup v1 memory directory (a limit below it nests inside ours)."""
        try:
            with open("/proc/self/cgroup") as f:
                rel = next((line.rstrip("\n").split(":", 2)[2] for line in f
                            if "memory" in line.split(":", 2)[1].split(",")), None)
            with open("/proc/self/mounts") as f:
                root = next((line.split()[1] for line in f
                             if line.split()[2] == "cgroup" and "memory" in line.split()[3].split(",")), None)
        except OSError:
            return None
        if rel is None or root is None:
            return None
        path = os.path.join(root, rel.lstrip("/"))
        return path if os.access(path, os.W_OK) else None

    def enter(self, pid: int = 0) -> None:
        _write(os.path.join(self.path, "cgroup.procs"), str(pid or os.getpid()))

    def stat(self) -> dict[str, int]:
        try:
            with open(os.path.join(self.path, "memory.stat")) as f:
                return {k: int(v) for k, v in (line.split() for line in f)}
        except OSError:
            return {}

    def events(self) -> dict[str, int]:
        """memory.events (v2): how often the limit was hit, how many OOM kills; {} on v1."""
        try:
            with open(os.path.join(self.path, "memory.events")) as f:
                return {k: int(v) for k, v in (line.split() for line in f)}
        except OSError:
            return {}

    def close(self) -> None:
        if self.path is None:
            return
        self._cleanup_dir(self.path)
        self._umount(self._mount)
        self.path = self._mount = None

    @staticmethod
    def _cleanup_dir(path: str) -> None:
        deadline = time.monotonic() + 10
        while os.path.isdir(path) and time.monotonic() < deadline:
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        try:
                            os.kill(int(pid), 9)
                        except ProcessLookupError:
                            pass
                os.rmdir(path)
            except OSError:
                time.sleep(0.05)

    @staticmethod
    def _umount(mount: str | None) -> None:
        if mount:
            subprocess.run(["umount", "-l", mount], capture_output=True)
            shutil.rmtree(mount, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


# -- swap devices: the requester process and the host's nbdfuse + loop route --------------------

READY_TIMEOUT = 30.0
STEP_TIMEOUT = 60.0


def sh(*cmd: str, timeout: float = STEP_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc


def swaps() -> list[str]:
    """Devices or files in use as swap, from /proc/swaps."""
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.readlines()[1:] if line.strip()]


def start_requester(config_path: str, name: str, size: int, sock: str, log_path: str,
                    timeout: float = READY_TIMEOUT, extra_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """``rram requester`` serving ``sock`` (``extra_args``: more of its options); returns (process,
    its ready line).  It locks its memory."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    out_path = log_path + ".out"
    with open(log_path, "a") as log, open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rram.frontends.requester", "--config", config_path,
                                 "--name", name, "--export-size", str(size), "--socket", sock, *extra_args],
                                stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(out_path) as f:
            line = next((x for x in f if x.startswith(f"rram requester {name} ready ")), None)
        if line:
            return proc, line.strip()
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(proc)
    with open(log_path) as f:
        tail = "".join(f.readlines()[-20:])
    raise RuntimeError(f"requester {name} not ready (status {proc.poll()}); {log_path}:\n{tail}")


def wait_for_path(path: str, proc: subprocess.Popen, timeout: float = READY_TIMEOUT) -> None:
    """Wait until ``proc`` (a server starting up) has created ``path``, e.g. its socket."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not create {path} (status {proc.poll()})")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; idempotent."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


class FuseLoopSwap:
    """Swap on an NBD server without kernel NBD: nbdfuse shows the export as a file, a loop
    device turns the file into a block device, and that becomes swap.

    ``close`` tears down in the only safe order — swapoff (pages come back from the server,
    which must still be alive), detach the loop device, unmount the FUSE file system (lazily
    if busy), stop nbdfuse — and keeps going when a step fails; it never stops the server.
    """

    def __init__(self, nbd_uri_args: list[str], workdir: str, priority: int = 100):
        self.mount = os.path.join(workdir, "fuse")
        os.makedirs(self.mount, exist_ok=True)
        self.file = os.path.join(self.mount, "disk")
        self.loop: str | None = None
        self.active = False
        self.errors: list[str] = []
        self._fuse = subprocess.Popen(["nbdfuse", self.file, *nbd_uri_args], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            try:
                wait_for_path(self.file, self._fuse)
            except RuntimeError as exc:
                if self._fuse.poll() is not None:  # it exited: its stderr says why
                    raise RuntimeError(f"{exc}: {self._fuse.stderr.read()[-500:]}") from None
                raise
            self.loop = self._losetup()
            sh("mkswap", self.loop)
            sh("swapon", "-p", str(priority), self.loop)
            self.active = True
        except BaseException:
            self.close()
            raise

    def _losetup(self) -> str:
        # direct I/O: swap pages go straight to the server, not through a second page cache
        proc = sh("losetup", "-f", "--show", "--direct-io=on", self.file, check=False)
        if proc.returncode:
            proc = sh("losetup", "-f", "--show", self.file)
        return proc.stdout.strip()

    def close(self) -> list[str]:
        """Tear down; returns what went wrong (empty when clean).  Idempotent."""
        if self.loop and self.loop in swaps():
            proc = sh("swapoff", self.loop, timeout=4 * STEP_TIMEOUT, check=False)
            if proc.returncode:
                self.errors.append(f"swapoff {self.loop}: {proc.stderr.strip()}")
        self.active = bool(self.loop and self.loop in swaps())
        if self.active:  # still swap: detaching would turn every swapped page into an I/O error
            self.errors.append(f"{self.loop} is still swap; left attached")
            return self.errors
        if self.loop:
            if sh("losetup", "-d", self.loop, check=False).returncode:
                self.errors.append(f"losetup -d {self.loop} failed")
            self.loop = None
        if self._fuse is not None:
            if self._fuse.poll() is None and sh("fusermount3", "-u", self.mount, check=False).returncode:
                sh("umount", "-l", self.mount, check=False)
            try:
                self._fuse.wait(10)
            except subprocess.TimeoutExpired:
                self._fuse.kill()
                self._fuse.wait()
            self._fuse.stderr.close()
            self._fuse = None
        return self.errors

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def command(mib: int, passes: int = 1, seed: int = 1, cgroup: str | None = None, hold: bool = False) -> list[str]:
    """The argv that runs this workload in a new interpreter (inside ``cgroup`` if given)."""
    argv = [sys.executable, "-m", "rram.testing.swapload", "--mib", str(mib), "--passes", str(passes),
            "--seed", str(seed)]
    return argv + (["--cgroup", cgroup] if cgroup else []) + (["--hold"] if hold else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="swapload", description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, required=True, help="working set in MiB")
    p.add_argument("--passes", type=int, default=1, help="write passes (each later one checks the previous)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cgroup", help="move into this cgroup directory first")
    p.add_argument("--hold", action="store_true", help="wait for stdin to close before the final check")
    a = p.parse_args(argv)
    if a.mib <= 0 or a.passes <= 0:
        p.error("--mib and --passes must be positive")
    if a.cgroup:
        _write(os.path.join(a.cgroup, "cgroup.procs"), str(os.getpid()))
    summary = run(a.mib, a.passes, a.seed, a.hold)
    print(json.dumps(summary), flush=True)
    return 0 if summary["bad_pages"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
