"""The requester guest's part of the machine-lost test (tests/vmcluster/test_machine_lost.py).

Runs inside the requester's guest once its bridge and soft-RoCE device are up: waits for the
provider guests, brings up swap on /dev/nbd0 through scripts/requester.sh (rram requester over
verbs to the other guests), runs the verifying swap workload in a memory cgroup, and once pages
are swapping asks the host to power one provider guest off (qemu killed: no goodbye, no FIN,
no RDMA disconnect).  Swap must go on and every page must verify.  Prints one RESULT line.

With ``--flaky MAC SECONDS``, first a flaky link: for SECONDS from the workload's start, the
link to one provider (the NIC with MAC) loses 20 % of its packets and delays the rest by 50 ms,
both ways (tc netem on the NIC's egress, and on its ingress through an ifb device), while the
other provider is healthy; then it heals, and only then is the victim powered off.

    python tests/vmcluster/requester_job.py CONFIG VICTIM [--flaky MAC SECONDS]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from rram import config as C  # noqa: E402
from rram.testing.swapload import MemoryLimit, command, swaps, vmstat  # noqa: E402

MiB = 1 << 20
DEV = "/dev/nbd0"
WORKING_SET_MIB = 32
LIMIT = 12 * MiB
#: pages swapped out before the power-off: by then every provider holds replicas
KILL_AFTER_PSWPOUT = 2500
RUN = os.environ.get("RXE_RUN_DIR", "/run/rxe-run")
#: the requester's Prometheus /metrics inside this guest: the job reads degraded_slabs there
METRICS_PORT = 9109
NETEM = ["delay", "50ms", "loss", "20%"]


def log(msg: str) -> None:
    print(f"requester-job {time.monotonic():8.1f}: {msg}", flush=True)


def wait_for_providers(cfg, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    for node in (n for n in cfg.nodes if "provider" in n.roles):
        while True:
            try:
                socket.create_connection((node.address, node.port), timeout=2).close()
                log(f"provider {node.name} at {node.address}:{node.port} answers")
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise SystemExit(f"provider {node.name} never answered: {exc}") from exc
                time.sleep(1)


def power_off(victim: str, timeout: float = 60.0) -> None:
    """Ask the host to kill the victim guest's qemu; return once it says it did."""
    with open(os.path.join(RUN, "poweroff.tmp"), "w") as f:
        f.write(victim)
    os.rename(os.path.join(RUN, "poweroff.tmp"), os.path.join(RUN, "poweroff"))
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(RUN, "poweroff.done")):
        if time.monotonic() > deadline:
            raise SystemExit("the host did not power the victim off")
        time.sleep(0.2)
    log(f"{victim} is powered off")


def requester_stat(name: str) -> float | None:
    """One numeric stat of the requester (its /metrics gauge rram_requester_<name>)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"rram_requester_{name}{{") or line.startswith(f"rram_requester_{name} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_until_whole(timeout: float = 180.0) -> None:
    """Until every slab has all its copies: slabs leased while a provider was suspended (the
    lossy link) start with one copy and are re-replicated once it resumes.  Powering the other
    provider off before that would lose pages that never had a second copy, which is no test
    of surviving a machine loss."""
    deadline = time.monotonic() + timeout
    while (degraded := requester_stat("degraded_slabs")) != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"slabs still degraded after {timeout:.0f}s: {degraded}")
        time.sleep(0.5)
    log("every slab has its copies")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def nic_with_mac(mac: str) -> str:
    """The NIC (a virtio device, not the bridge that borrowed its first port's MAC) with ``mac``."""
    for nic in os.listdir("/sys/class/net"):
        if not os.path.exists(f"/sys/class/net/{nic}/device"):
            continue
        with open(f"/sys/class/net/{nic}/address") as f:
            if f.read().strip() == mac:
                return nic
    raise SystemExit(f"no NIC has MAC {mac}")


def make_lossy(nic: str) -> None:
    """netem both ways on ``nic``: egress directly, ingress redirected through ifb0."""
    sh("modprobe", "sch_netem")
    sh("modprobe", "ifb", "numifbs=1")
    sh("ip", "link", "set", "ifb0", "up")
    sh("tc", "qdisc", "add", "dev", nic, "root", "netem", *NETEM)
    sh("tc", "qdisc", "add", "dev", nic, "handle", "ffff:", "ingress")
    sh("tc", "filter", "add", "dev", nic, "parent", "ffff:", "matchall", "action", "mirred", "egress",
       "redirect", "dev", "ifb0")
    sh("tc", "qdisc", "add", "dev", "ifb0", "root", "netem", *NETEM)
    log(f"{nic}: netem {' '.join(NETEM)} both ways")


def heal(nic: str) -> None:
    sh("tc", "qdisc", "del", "dev", nic, "root")
    sh("tc", "qdisc", "del", "dev", nic, "ingress")
    sh("tc", "qdisc", "del", "dev", "ifb0", "root")
    log(f"{nic}: healed")


def victim_state(requester_out: str, victim: str) -> str | None:
    """The victim's state in the stats line `rram requester` prints when it stops."""
    lines = [line for line in requester_out.splitlines() if " stats {" in line]
    if not lines:
        return None
    return json.loads(lines[-1].split(" stats ", 1)[1]).get("providers", {}).get(victim)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("victim")
    p.add_argument("--flaky", nargs=2, metavar=("MAC", "SECONDS"))
    args = p.parse_args()
    config_path, victim = args.config, args.victim
    cfg = C.load(config_path)
    wait_for_providers(cfg)
    env = dict(os.environ, RRAM_RUN="/tmp/rram-run", RRAM_STEP_TIMEOUT="60",
               RRAM=f"{sys.executable} -m rram requester --metrics-port {METRICS_PORT}", PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "scripts", "requester.sh")
    up = subprocess.run(["bash", script, "up", config_path, "req", "128MiB", DEV, "100"], env=env,
                        capture_output=True, text=True, timeout=300)
    log(f"requester.sh up: exit {up.returncode}\n{up.stdout}{up.stderr}")
    if up.returncode != 0 or DEV not in swaps():
        return 1
    result = {"ok": False}
    # memory.high, not memory.max: losing a provider may stall swap-out for up to the suspect
    # threshold, and a hard limit turns such a stall into an OOM kill (seen in CI: killed 0.2 s
    # after the power-off, every page intact).  Above memory.high the workload is throttled
    # and swaps, so the stall shows as time, and the verification still covers every page.
    limit = MemoryLimit.make(LIMIT, throttle=True)
    if limit is None:
        raise SystemExit(f"no memory cgroup: {MemoryLimit.reason}")
    try:
        with limit:
            base = vmstat()
            work = subprocess.Popen(command(WORKING_SET_MIB, passes=2, cgroup=limit.path),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if args.flaky:
                nic = nic_with_mac(args.flaky[0])
                make_lossy(nic)
                time.sleep(float(args.flaky[1]))
                heal(nic)
                base = vmstat()
            while vmstat()["pswpout"] - base["pswpout"] < KILL_AFTER_PSWPOUT and work.poll() is None:
                time.sleep(0.2)
            wait_until_whole()
            at_kill = vmstat()
            log(f"{at_kill['pswpout'] - base['pswpout']} pages swapped out: powering {victim} off")
            t_kill = time.monotonic()
            power_off(victim)
            out, err = work.communicate(timeout=900)
            took = time.monotonic() - t_kill
            end = vmstat()
            events = limit.events()
        summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        after = {k: end[k] - at_kill[k] for k in ("pswpin", "pswpout")}
        log(f"workload exit {work.returncode} {took:.1f}s after the power-off: {summary}; "
            f"swapped after the power-off: {after}; cgroup memory.events {events}\n{err[-3000:]}")
        result = {"ok": work.returncode == 0 and summary.get("bad_pages") == 0
                  and after["pswpin"] > 0 and after["pswpout"] > 0,
                  "bad_pages": summary.get("bad_pages"), "after_poweroff": after,
                  "seconds_after_poweroff": round(took, 1)}
    finally:
        down = subprocess.run(["bash", script, "down", DEV], env=env, capture_output=True, text=True,
                              timeout=400)
        log(f"requester.sh down: exit {down.returncode}\n{down.stdout}{down.stderr}")
        outputs = {}
        for name in ("requester-nbd0.out", "requester-nbd0.log"):
            try:
                with open(os.path.join("/tmp/rram-run", name)) as f:
                    outputs[name] = f.read()
                log(f"{name} (tail):\n{outputs[name][-3000:]}")
                events = [line[:240] for line in outputs[name].splitlines() if " WARNING " in line or " ERROR " in line]
                if len(events) > 60:  # the first faults explain the rest
                    events = events[:40] + [f"... {len(events) - 60} more ..."] + events[-20:]
                if events:
                    log(f"{name}: warnings and errors:\n" + "\n".join(events))
            except OSError:
                pass
    # The requester must have seen the machine go: a run where the victim stayed "alive" lost
    # nothing because nothing was lost (the power-off did not happen), and proves nothing.
    seen = victim_state(outputs.get("requester-nbd0.out", ""), victim)
    result.update(victim_state=seen, ok=result["ok"] and seen not in (None, "alive"))
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if result["ok"] and down.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
