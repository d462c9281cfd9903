"""A real application for swap benchmarks: Redis, loaded with compressible values, driven by
its own load generator (Debian's redis-server and redis-benchmark, not ours).

    with Redis(workdir, cgroup, cpu="0") as redis:   # redis-server inside the memory cgroup
        redis.load(keys=65536)                       # SETs of 4 KiB values through redis-cli --pipe
        row = redis.gets(keys=65536, requests=40000) # redis-benchmark's CSV row: rps, p50, p99...

Each value is about 2:1 compressible like real data: half random bytes, half a repeated tag.
Redis runs on a unix socket with no persistence, pinned to ``cpu`` with its load generator.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import time

import numpy as np

from .swapload import stop_process, wait_for_path

VALUE = 4096
CLIENTS = 8  # redis-benchmark connections, no pipelining: most GETs wait on a page that is out


def reason() -> str | None:
    """Why Redis cannot run here, or None."""
    if shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None:
        return "redis-server / redis-benchmark are not installed (scripts/setup.sh installs them)"
    return None


def _resp_sets(first: int, n: int, rng: np.random.Generator) -> bytes:
    """RESP SET commands for keys first..first+n in redis-benchmark's key format."""
    out = io.BytesIO()
    noise = rng.integers(0, 256, size=(n, VALUE // 2), dtype=np.uint8)
    for i in range(n):
        key = b"key:%012d" % (first + i)
        value = noise[i].tobytes() + (b"%016d" % (first + i)) * (VALUE // 32)
        out.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value))
    return out.getvalue()


class Redis:
    """redis-server on a unix socket in ``workdir``, inside ``cgroup``, pinned to ``cpu``."""

    def __init__(self, workdir: str, cgroup: str, cpu: str = "0"):
        self.cpu = cpu
        self.cgroup = cgroup
        self.sock = os.path.join(workdir, "redis.sock")
        argv = [*self._pin(), "redis-server", "--port", "0", "--unixsocket", self.sock,
                "--save", "", "--appendonly", "no", "--dir", workdir, "--daemonize", "no"]
        self.proc = subprocess.Popen(["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *argv],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_for_path(self.sock, self.proc)
        time.sleep(0.2)

    def _pin(self) -> list[str]:
        return ["taskset", "-c", self.cpu] if (os.cpu_count() or 1) > 1 else []

    def load(self, keys: int) -> None:
        rng = np.random.default_rng(7)
        for first in range(0, keys, 4096):
            n = min(4096, keys - first)
            proc = subprocess.run(["redis-cli", "-s", self.sock, "--pipe"], input=_resp_sets(first, n, rng),
                                  capture_output=True, timeout=900)
            assert proc.returncode == 0 and b"errors: 0" in proc.stdout, proc.stdout + proc.stderr
        assert self.cli("DBSIZE") == str(keys)

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-s", self.sock, *args], capture_output=True, text=True,
                              timeout=120).stdout.strip()

    def gets(self, keys: int, requests: int, clients: int = CLIENTS, timeout: float = 900) -> dict:
        """``requests`` GETs over random keys from redis-benchmark; its CSV row as numbers."""
        proc = subprocess.run([*self._pin(), "redis-benchmark", "-s", self.sock, "-t", "get", "-r", str(keys),
                               "-n", str(requests), "-c", str(clients), "-d", str(VALUE), "--csv"],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"redis-benchmark failed ({proc.stderr.strip()}){self._fate()}")
        rows = list(csv.DictReader(io.StringIO(proc.stdout)))
        assert rows and rows[0]["test"] == "GET", proc.stdout
        return {k: float(v) for k, v in rows[0].items() if k != "test"}

    def _fate(self) -> str:
        """What became of redis-server, for an error message: whether it exited, and the
        cgroup's OOM kills (a hard memory limit kills a workload whose swap-out stalls)."""
        out = ""
        if self.proc.poll() is not None:
            out += f": redis-server exited ({self.proc.returncode})"
        try:
            with open(os.path.join(self.cgroup, "memory.events")) as f:
                events = dict(line.split() for line in f if line.strip())
            out += f"; its cgroup's memory.events: oom {events.get('oom', '?')}, oom_kill {events.get('oom_kill', '?')}"
        except OSError:
            pass
        return out

    def close(self) -> None:
        stop_process(self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
