"""Real swap on rram through the kernel's NBD client (the soft-RoCE VM has /dev/nbd*).

Two providers (LocalCluster; verbs over rxe when the guest has it, else tcp), then
`scripts/requester.sh up` (rram requester on a unix socket, nbd-client -swap, mkswap,
swapon), then the verifying workload (rram.testing.swapload) in a cgroup v2 whose memory.max is
far below its working set, so the kernel swaps that process alone onto /dev/nbd0 and back.
Providers' counters prove that the pages went to them and came back.  `requester.sh down`
must tear it all down; a second test stops the requester first (the wrong order) and checks
that `down` still finishes within its bounds.  Sized for TCG (~50x slower than hardware).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from rram import config as C
from rram.testing.cluster import _ROOT, LocalCluster, free_port
from rram.testing.swapload import MemoryLimit, command, swaps
from rram.transport import verbs
from tests.conftest import require_or_skip

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(300)]

MiB = 1 << 20
DEV = "/dev/nbd0"
EXPORT = "128MiB"
WORKING_SET_MIB = 48
LIMIT = 16 * MiB
STEP_TIMEOUT = 30  # each of swapoff / nbd-client / requester stop in requester.sh
SCRIPT = os.path.join(_ROOT, "scripts", "requester.sh")


def _nbd_reason() -> str | None:
    if os.geteuid() != 0:
        return "swap on NBD needs root"
    if not os.path.exists(DEV):
        subprocess.run(["modprobe", "nbd", "nbds_max=4"], capture_output=True)
    if not os.path.exists(DEV):
        return f"{DEV} is missing: no kernel NBD client here (run in the soft-RoCE VM, scripts/rxe-vm/run)"
    if shutil.which("nbd-client") is None:
        return "nbd-client is not installed"
    return None


def provider_stats(cluster) -> list[dict]:
    return list(cluster.provider_stats("swap-vm-observer").values())


class Stack:
    """Providers plus the environment in which scripts/requester.sh runs the requester."""

    def __init__(self, cluster, config_path: str, run_dir: str):
        self.cluster, self.config_path, self.run_dir = cluster, config_path, run_dir
        self.env = dict(os.environ, RRAM_RUN=run_dir, RRAM_STEP_TIMEOUT=str(STEP_TIMEOUT),
                        RRAM=f"{sys.executable} -m rram.frontends.requester",
                        PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))

    def script(self, *args: str, timeout: float = 6 * STEP_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env, stdin=subprocess.DEVNULL)

    def up(self) -> None:
        proc = self.script("up", self.config_path, "req", EXPORT, DEV, "100")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert DEV in swaps()

    def requester_pid(self) -> int | None:
        try:
            with open(os.path.join(self.run_dir, f"requester-{os.path.basename(DEV)}.pid")) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def force_down(self) -> None:
        """Last-resort cleanup: never leave /dev/nbd0 as swap or attached."""
        if DEV in swaps():
            subprocess.run(["swapoff", DEV], capture_output=True, timeout=4 * STEP_TIMEOUT)
        self.script("down", DEV)


@contextlib.contextmanager
def swap_stack(name: str):
    """Two providers over transport ``name`` and a Stack whose requester swaps on DEV; always
    leaves DEV neither swap nor attached."""
    tmp = tempfile.mkdtemp(prefix="rram-vmswap-")
    with LocalCluster(n_providers=2, capacity="128MiB", transport=name, workdir=tmp, slab_size="1MiB",
                      verbose=False, requester={"local_budget": "2MiB"}) as cluster:
        cfg = C.load(cluster.config_path)
        if name == "verbs":  # the requester takes the last device: pages cross rxe1 -> rxe0
            from rram._ext import _verbs

            device = _verbs.device_names()[0][-1]
            cfg.nodes.append(C.NodeConfig(name="req", address="127.0.0.1", port=free_port(), roles=["requester"],
                                          rdma_device=device, gid_index=0))
        config_path = os.path.join(tmp, "swap.yaml")
        with open(config_path, "w") as f:
            f.write(C.dump(cfg))
        s = Stack(cluster, config_path, os.path.join(tmp, "run"))
        try:
            yield s
        finally:
            s.force_down()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def stack():
    require_or_skip(_nbd_reason())
    with swap_stack("verbs" if verbs.unavailable_reason() is None else "tcp") as s:
        yield s


@pytest.fixture
def limit():
    lim = MemoryLimit.make(LIMIT)
    require_or_skip(None if lim else f"no memory cgroup for the workload: {MemoryLimit.reason}")
    with lim:
        yield lim


def test_swap_on_nbd_verifies_every_page_and_tears_down(stack, limit):
    t0 = time.monotonic()
    try:
        stack.up()
        proc = subprocess.run(command(WORKING_SET_MIB, passes=1, cgroup=limit.path), capture_output=True,
                              text=True, timeout=200)
        assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"swap on {DEV} ({stack.cluster.config.transport}): {summary}")
        assert summary["bad_pages"] == 0
        excess = (WORKING_SET_MIB * MiB - LIMIT) // 4096
        assert summary["pswpout"] >= excess and summary["pswpin"] >= excess // 2, summary
        # pages went remote: the 2 MiB local budget overflowed into leased provider slabs; over
        # tcp the providers also count the bytes (one-sided verbs bypass the provider's CPU)
        stats = provider_stats(stack.cluster)
        print("providers:", [{k: s[k] for k in ("node", "used", "leases", "bytes_written", "bytes_read")}
                             for s in stats])
        assert sum(s["used"] for s in stats) >= 4 * MiB, stats
        if stack.cluster.config.transport == "tcp":
            assert sum(s["bytes_written"] for s in stats) >= 4 * MiB, stats
            assert sum(s["bytes_read"] for s in stats) > 0, stats
    finally:
        down = stack.script("down", DEV)
    assert down.returncode == 0, down.stdout + down.stderr
    assert DEV not in swaps()
    assert stack.script("status", DEV).stdout.count("not ") == 2  # not swap, not attached
    assert stack.requester_pid() is None
    print(f"up + workload + down: {time.monotonic() - t0:.1f}s")


def _alive(pid: int) -> bool:
    """Running (a zombie is not: requester.sh's child may be reaped late by the guest's init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_wrong_order_teardown_does_not_hang(stack, limit):
    """Stop the requester while a live process has pages in the swap: `down` must still finish."""
    stack.up()
    argv = command(WORKING_SET_MIB // 2, passes=1, cgroup=limit.path, hold=True)
    holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert json.loads(holder.stdout.readline()).get("holding"), "the workload did not reach its hold point"
        assert int(subprocess.run(["awk", f'$1=="{DEV}"{{print $4}}', "/proc/swaps"],
                                  capture_output=True, text=True).stdout or 0) > 0, "nothing was swapped out"
        pid = stack.requester_pid()
        os.kill(pid, signal.SIGTERM)  # the wrong order: the server goes first
        t = time.monotonic()
        while _alive(pid) and time.monotonic() - t < STEP_TIMEOUT:
            time.sleep(0.1)
        assert not _alive(pid), "the requester did not stop on SIGTERM"
        down = stack.script("down", DEV, timeout=6 * STEP_TIMEOUT)
        took = time.monotonic() - t
        print(f"wrong-order down: exit {down.returncode} after {took:.1f}s\n{down.stdout}{down.stderr}")
        assert took < 5 * STEP_TIMEOUT
        assert "WARNING: the requester is gone" in down.stderr
    finally:
        holder.kill()  # its swapped pages are lost: it must not touch them again
        holder.wait(30)
        holder.stdin.close()
        holder.stdout.close()
        stack.force_down()
    assert DEV not in swaps()
    assert "not attached" in stack.script("status", DEV).stdout
