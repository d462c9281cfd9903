"""Run one perftest client/server pair (ib_read_lat, ib_write_bw, ...) pinned to CPUs; parse it.

    python bench/vm/run_perftest.py ib_read_lat rxe0 rxe1      # server device, client device

The server runs on ``server_dev``, the client on ``client_dev``, both with ``-x 0`` (GID
index 0), ``-s 4096`` and any ``extra`` options; the out-of-band exchange goes over 127.0.0.1.  perftest's own
figures are recorded, never trusted blindly: it has printed 0.000 Gb/s with exit status 0,
so a zero bandwidth or message rate is kept as is and flagged ``suspect``.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

_COLUMN = re.compile(r"\S+(?: \S+)*?\[[^\]]+\]|#\w+")
#: perftest column -> our key
_KEYS = {
    "#bytes": "bytes", "#iterations": "iterations",
    "t_min[usec]": "min_us", "t_max[usec]": "max_us", "t_typical[usec]": "typical_us",
    "t_avg[usec]": "avg_us", "t_stdev[usec]": "stdev_us", "99% percentile[usec]": "p99_us",
    "99.9% percentile[usec]": "p999_us", "MsgRate[Mpps]": "msg_rate_mpps",
}


def parse(text: str) -> dict:
    """The result row of a perftest report as {key: float}; {} when there is none.

    Bandwidth columns keep their unit in the key (``bw_average_MB/sec``, ``bw_peak_Gb/sec``).
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("#bytes"):
            continue
        names = _COLUMN.findall(line)
        for row in lines[i + 1 :]:
            fields = row.split()
            if not fields or not re.fullmatch(r"\d+", fields[0]):
                continue
            if len(fields) != len(names):
                return {"unparsed": row.strip(), "header": line.strip()}
            out = {}
            for name, value in zip(names, fields):
                key = _KEYS.get(name) or re.sub(r"^BW (\w+)\[(.*)\]$", r"bw_\1_\2", name)
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
            return out
    return {}


def _listening(port: int) -> bool:
    hexport = f":{port:04X}"
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if parts[1].endswith(hexport) and parts[3] == "0A":  # LISTEN
                        return True
        except OSError:
            pass
    return False


def _cpus_of(pid: int, tool: str, timeout: float = 5.0) -> dict:
    """Allowed and last-run CPU of ``pid`` once it has exec'd ``tool`` (taskset set them first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == tool[:15]:
                    with open(f"/proc/{pid}/status") as f:
                        allowed = next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list"))
                    with open(f"/proc/{pid}/stat") as f:
                        last = int(f.read().rsplit(")", 1)[1].split()[36])  # field 39: processor
                    return {"allowed": allowed, "last_cpu": last}
        except (OSError, StopIteration, IndexError, ValueError):
            return {"allowed": "?", "last_cpu": None}
        time.sleep(0.01)
    return {"allowed": "?", "last_cpu": None}


def run_pair(tool: str, server_dev: str, client_dev: str, *, size: int = 4096, iters: int = 2000,
             port: int = 18515, server_cpu: int | None = 1, client_cpu: int | None = 0,
             gid_index: int = 0, timeout: float = 120.0, extra: tuple[str, ...] = ()) -> dict:
    """Run ``tool`` as server then client; returns the parsed figures, the CPUs and the raw output.
    ``extra`` goes to both sides (e.g. ``-t 1024`` for the queue depth rram runs at)."""
    def cmd(dev, cpu, *tail):
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        return pin + [tool, "-d", dev, "-x", str(gid_index), "-s", str(size), "-n", str(iters),
                      "-p", str(port), *extra, *tail]

    t0 = time.monotonic()
    server = subprocess.Popen(cmd(server_dev, server_cpu), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    client = None
    try:
        deadline = time.monotonic() + 20
        while not _listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                out = server.communicate()[0]
                raise RuntimeError(f"{tool} server did not start listening on port {port}:\n{out}")
            time.sleep(0.02)
        server_cpus = _cpus_of(server.pid, tool)
        client = subprocess.Popen(cmd(client_dev, client_cpu, "127.0.0.1"), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        client_cpus = _cpus_of(client.pid, tool)
        client_out = client.communicate(timeout=timeout)[0]
        server_out = server.communicate(timeout=timeout)[0]
    finally:
        for p in (client, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    figures = parse(client_out) or parse(server_out)
    rate = figures.get("msg_rate_mpps")
    result = {
        "tool": tool, "args": " ".join(cmd(client_dev, client_cpu, "127.0.0.1")),
        "server_device": server_dev, "client_device": client_dev,
        "exit": {"client": client.returncode, "server": server.returncode},
        "cpus": {"server": server_cpus, "client": client_cpus},
        "seconds": round(time.monotonic() - t0, 2), **figures,
    }
    if rate is not None:
        result["msgs_per_s"] = rate * 1e6
    result["suspect"] = (not figures or "unparsed" in figures or rate == 0.0
                         or figures.get("typical_us", 1.0) == 0.0 or client.returncode != 0)
    if result["suspect"]:
        result["raw_client"] = client_out[-4000:]
        result["raw_server"] = server_out[-4000:]
    return result


if __name__ == "__main__":
    tool, sdev, cdev = sys.argv[1:4]
    print(json.dumps(run_pair(tool, sdev, cdev), indent=2))
