"""A machine lost for real: three guests, each its own kernel, one powered off mid-swap.

The host boots two provider guests and a requester guest (scripts/rxe-vm/run, soft-RoCE over
a virtual Ethernet segment that only exists between the guests: qemu dgram netdevs, UDP on
the host's loopback).  The requester guest swaps a verifying workload onto /dev/nbd0, served by
`rram requester` with r=2 copies on the provider guests over verbs.  Once pages are out, the
requester guest asks the host to power one provider guest off: its qemu is SIGKILLed, so the
machine vanishes with no goodbye (no TCP FIN, no RDMA disconnect; reads to it time out).  Swap
must keep going and every page must verify (tests/vmcluster/requester_job.py).

The flaky variant (RRAM_VM_FLAKY=1, opt-in: see its skip reason) first makes the link
to the provider that will survive lose 20 % of its packets and delay the rest by 50 ms, both
ways (tc netem in the requester's guest), for FLAKY_SECONDS of the workload while both providers
live; then it heals, the slabs leased meanwhile with one copy are re-replicated, and the other
provider's machine is powered off.
(A lossy link that is the *only* one left is not tested: reads of its pages now wait while its
provider is suspended instead of failing, but RC retransmission over 20 % loss may not keep up
with swap.)

Boots three TCG guests (a few minutes on two cores): scripts/ci-vm.sh runs it with
RRAM_VM_CLUSTER=1; elsewhere it skips with that reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from rram import config as C
from rram import tls as T
from rram.testing.cluster import _ROOT, free_port

pytestmark = [
    pytest.mark.skipif(os.environ.get("RRAM_VM_CLUSTER") != "1",
                       reason="boots three soft-RoCE guests (minutes): scripts/ci-vm.sh runs it (RRAM_VM_CLUSTER=1)"),
    pytest.mark.timeout(1200),
]

RUN = os.path.join(_ROOT, "scripts", "rxe-vm", "run")
GUEST = os.path.join(_ROOT, "tests", "vmcluster", "guest.sh")
JOB = os.path.join(_ROOT, "tests", "vmcluster", "requester_job.py")
PROVIDERS = {"mem1": "169.254.78.11", "mem2": "169.254.78.12"}
REQUESTER = "169.254.78.1"
VICTIM = "mem2"
GUEST_TIMEOUT = 1000


def requester_mac(i: int) -> str:
    """The MAC of the requester guest's NIC facing the i-th provider guest."""
    return f"52:54:00:78:01:{0x11 + i:02x}"


#: the requester's NIC facing the provider that survives: the flaky link
LOSSY_MAC = requester_mac(list(PROVIDERS).index("mem1"))
FLAKY_SECONDS = 20


def cluster_file(path: str) -> None:
    node = {"port": 7777, "data_port": 7778, "rdma_device": "rxenet", "gid_index": 0}
    nodes = [{"name": name, "address": addr, "capacity": "128MiB", "roles": ["provider"],
              "failure_domain": f"guest-{name}", **node} for name, addr in PROVIDERS.items()]
    nodes.append({"name": "req", "address": REQUESTER, "roles": ["requester"], **node})
    # control connections over TLS as in any cluster: the CA and the providers' certificates
    tls_dir = os.path.join(os.path.dirname(path), "tls")
    T.make_cluster(tls_dir, "vmcluster", list(PROVIDERS.items()))
    cfg = C.from_dict({"name": "vmcluster", "secret": os.urandom(16).hex(), "transport": "verbs", "tls_dir": tls_dir,
                       "slab_size": "1MiB", "replicas": 2, "heartbeat_interval": 0.5,
                       # TCG guests on a loaded 2-core host can stall for seconds: a 4 s dead
                       # threshold once declared the surviving provider dead too (in a run with
                       # the host's load at 5; 10 s at a load of 6), and its pages were gone with it
                       "suspect_threshold": 3.0, "dead_threshold": 15.0, "lease_grace": 30.0,
                       "nodes": nodes, "requester": {"local_budget": "2MiB"}}, source=path)
    with open(path, "w") as f:
        f.write(C.dump(cfg))


class Guest:
    def __init__(self, name: str, workdir: str, net: str, argv: list[str], smp: int, mem: int):
        self.name = name
        self.run_dir = os.path.join(workdir, f"run-{name}")
        os.makedirs(self.run_dir)
        self.log_path = os.path.join(workdir, f"{name}.log")
        env = dict(os.environ, RXE_NET=net, RXE_RUN=self.run_dir, RXE_SMP=str(smp), RXE_MEM=str(mem),
                   RXE_TIMEOUT=str(GUEST_TIMEOUT))
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([RUN, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=_ROOT)

    def power_off(self) -> None:
        """qemu and its wrapper killed at once: the machine is gone, nothing says goodbye.

        Every process of the guest's session dies, not just the wrapper's process group:
        GNU timeout (which runs qemu in scripts/rxe-vm/run) moves itself and qemu into a group
        of their own, so killing the group alone left the guest running.
        """
        sid = str(self.proc.pid)  # start_new_session: the wrapper leads its own session
        for _ in range(50):
            subprocess.run(["pkill", "-KILL", "-s", sid], capture_output=True)
            states = subprocess.run(["ps", "-s", sid, "-o", "stat="], capture_output=True, text=True).stdout
            if all(state.startswith("Z") for state in states.split()):
                break  # nothing of the session runs (zombies wait for a reaper that may not exist)
            time.sleep(0.1)
        else:
            raise AssertionError(f"guest {self.name} still has processes after SIGKILL")
        self.proc.wait(30)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@pytest.mark.parametrize("flaky", [
    False,
    pytest.param(True, marks=pytest.mark.skipif(
        os.environ.get("RRAM_VM_FLAKY") != "1",
        reason="opt-in (RRAM_VM_FLAKY=1): since the guest links became UDP pairs it passed 3 of 3 runs on "
               "an idle host, not yet tried under load (over TCP stream links, at a host load of 5-8, 1 of 2)")),
])
def test_provider_machine_powered_off_mid_swap(flaky):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: scripts/setup.sh installs it")
    workdir = tempfile.mkdtemp(prefix="rram-vmcluster-", dir="/var/tmp")  # read by the guests over 9p
    config = os.path.join(workdir, "cluster.yaml")
    cluster_file(config)
    # one link per provider: a UDP pair on the host's loopback (qemu's dgram netdev).  A slow
    # or dead peer drops frames as a real wire would; a stream netdev (TCP) instead stalls the
    # sender's transmit queue when its peer lags (once 15 s on a loaded host: the guest's
    # virtio-net watchdog fired and the surviving provider was declared dead)
    ports = {name: (free_port(), free_port()) for name in PROVIDERS}  # (provider's end, requester's)

    def dgram(nid: str, local: int, remote: int) -> str:
        return (f"-netdev dgram,id={nid},local.type=inet,local.host=127.0.0.1,local.port={local},"
                f"remote.type=inet,remote.host=127.0.0.1,remote.port={remote}")

    guests: dict[str, Guest] = {}
    try:
        for i, (name, addr) in enumerate(PROVIDERS.items()):
            net = f"{dgram('n0', *ports[name])} -device virtio-net-pci,netdev=n0,mac=52:54:00:78:00:{0x11 + i:02x}"
            guests[name] = Guest(name, workdir, net, ["bash", GUEST, "provider", name, addr, config],
                                 smp=1, mem=1024)
        net = " ".join(f"{dgram(f'n{i}', ports[name][1], ports[name][0])} "
                       f"-device virtio-net-pci,netdev=n{i},mac={requester_mac(i)}"
                       for i, name in enumerate(PROVIDERS))
        req = Guest("req", workdir, net, ["bash", GUEST, "requester", REQUESTER, config,
                                          "python", JOB, config, VICTIM,
                                          *(["--flaky", LOSSY_MAC, str(FLAKY_SECONDS)] if flaky else [])],
                    smp=2, mem=2048)
        guests["req"] = req
        deadline = time.monotonic() + GUEST_TIMEOUT + 60
        order = os.path.join(req.run_dir, "poweroff")
        while req.proc.poll() is None and time.monotonic() < deadline:
            if os.path.exists(order) and not os.path.exists(order + ".done"):
                with open(order) as f:
                    victim = f.read().strip()
                guests[victim].power_off()
                print(f"host: powered {victim} off (qemu SIGKILLed)")
                with open(order + ".done", "w") as f:
                    f.write("ok")
            time.sleep(0.2)
        rc = req.proc.poll()
        out = req.log()
        result = [line for line in out.splitlines() if line.startswith("RESULT ")]
        print(out[-12000:])
        if rc != 0:
            for name in PROVIDERS:
                print(f"---- {name} (tail)\n{guests[name].log()[-3000:]}", file=sys.stderr)
        assert os.path.exists(order + ".done"), "the requester never asked for the power-off"
        assert rc == 0 and result, f"requester guest exit {rc}"
        assert '"ok": true' in result[-1], result[-1]
    finally:
        for guest in guests.values():
            guest.power_off()
        shutil.rmtree(workdir, ignore_errors=True)
