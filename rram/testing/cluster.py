"""A cluster of real provider processes on loopback, for tests, the demo and benchmarks.

    with LocalCluster(n_providers=2, capacity="256MiB", lease_grace=1.0) as cluster:
        store = rram.connect(cluster.config_path)
        cluster.kill("p0")                 # SIGKILL: a crashed node
        cluster.restart("p0")

Each provider is ``python -m rram provider`` with its stdout and log in ``workdir``; the
harness waits for its ready line.  Control connections run TLS 1.3 (a CA and provider
certificates in ``workdir/tls``) unless ``tls=False``; ``cluster.tls`` is the client context.
Children die with the harness (PR_SET_PDEATHSIG) and ``stop()`` terminates, then kills, so no
process outlives a test.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .. import config as C
from .. import errors
from .. import tls as T

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
_PR_SET_PDEATHSIG = 1
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, below the kernel's ephemeral range: a port the
    kernel hands out (a listener on port 0, the local end of any outgoing connection) could be
    taken between now and the provider's bind, as one was in a benchmark run (EADDRINUSE)."""
    rng = secrets.SystemRandom()
    low = _ephemeral_low()
    for _ in range(100) if low > 11000 else ():
        port = rng.randrange(10000, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below it: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class LocalCluster:
    def __init__(self, n_providers: int = 2, capacity="256MiB", transport: str = "tcp", secret: str | None = None,
                 replicas: int | None = None, workdir: str | None = None, *, io_timeout: float | None = None,
                 verbose: bool = True, tls: bool = True, **cluster_opts):
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="rram-cluster-")
        self.secret = secret or secrets.token_hex(16)
        self.io_timeout = io_timeout
        self.verbose = verbose
        cap = C.format_size(C.parse_size(capacity))
        nodes = [{"name": f"p{i}", "address": "127.0.0.1", "port": free_port(), "capacity": cap,
                  "roles": ["provider"]} for i in range(n_providers)]
        data = {"name": "local", "secret": self.secret, "transport": transport, "nodes": nodes,
                "keys_dir": os.path.join(self.workdir, "keys"), **cluster_opts}
        if tls:
            data["tls_dir"] = os.path.join(self.workdir, "tls")
            T.make_cluster(data["tls_dir"], data["name"], [(n["name"], n["address"]) for n in nodes])
        if replicas is not None:  # else the cluster default: 2 copies where there are 2 providers
            data["replicas"] = replicas
        self.config_path = os.path.join(self.workdir, "cluster.yaml")
        self.config = C.from_dict(data, source=self.config_path)
        #: the client side of control connections (None: plaintext)
        self.tls = T.cluster_client_context(self.config)
        with open(self.config_path, "w") as f:
            f.write(C.dump(self.config))
        self.providers = [n["name"] for n in nodes]
        self.procs: dict[str, subprocess.Popen] = {}
        try:
            for name in self.providers:
                self.start(name)
        except BaseException:
            self.stop()
            raise

    # -- processes ------------------------------------------------------------------------------

    def log_path(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.log")

    def start(self, name: str) -> subprocess.Popen:
        """Start provider ``name`` and wait for its ready line."""
        self.config.node(name)
        if name in self.procs and self.procs[name].poll() is None:
            raise errors.RramError(f"provider {name} is already running")
        out_path = os.path.join(self.workdir, f"{name}.out")
        cmd = [sys.executable, "-m", "rram"] + (["-v"] if self.verbose else []) + [
            "provider", "--config", self.config_path, "--name", name]
        if self.io_timeout is not None:
            cmd += ["--io-timeout", str(self.io_timeout)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        with open(out_path, "w") as out, open(self.log_path(name), "a") as log:
            proc = subprocess.Popen(cmd, stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=_die_with_parent)
        self.procs[name] = proc
        self._wait_ready(name, proc, out_path)
        return proc

    def _wait_ready(self, name: str, proc: subprocess.Popen, out_path: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            with open(out_path) as f:
                if any(line.startswith(f"rram provider {name} ready ") for line in f):
                    return
            if proc.poll() is not None:
                raise errors.RramError(f"provider {name} exited with status {proc.returncode} before it was "
                                       f"ready; its log:\n{self.log_tail(name)}")
            time.sleep(0.02)
        raise errors.RramError(f"provider {name} not ready after {READY_TIMEOUT:g}s; its log:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            with open(self.log_path(name)) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def credential(self, name: str, role: str = "requester"):
        """A key for ``name`` in ``role``, derived from the cluster's master key (the harness holds it)."""
        from ..control import keys

        return keys.credential(self.config, name, role)

    def client(self, node: str, name: str, role: str = "requester", **kwargs):
        """A connected ProviderClient to provider ``node`` as ``name`` in ``role``."""
        from ..control.client import ProviderClient

        kwargs.setdefault("tls", self.tls)
        c = ProviderClient(self.config.node(node), self.credential(name, role), **kwargs)
        try:
            c.connect()
        except BaseException:
            c.close()
            raise
        return c

    def save_config(self) -> None:
        """Write ``self.config`` back (after a test changed quotas or revocations; then reload)."""
        with open(self.config_path, "w") as f:
            f.write(C.dump(self.config))

    def provider_stats(self, requester: str = "cluster-observer") -> dict[str, dict]:
        """Each running provider's ``stats`` reply, by name (asked as an operator)."""
        from ..control.client import ProviderClient

        out = {}
        for name in self.providers:
            with ProviderClient(self.config.node(name), self.credential(requester, "operator"), tls=self.tls) as client:
                client.connect()
                out[name] = client.stats()
        return out

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` to provider ``name``; returns its exit status once it is gone (SIGKILL/SIGTERM)."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            try:
                return proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()
        return None

    def restart(self, name: str) -> subprocess.Popen:
        """Stop ``name`` (if running) and start it again on the same ports: a new incarnation, no leases."""
        if self.alive(name):
            self.kill(name, signal.SIGTERM)
        return self.start(name)

    def stop(self) -> None:
        """Terminate every provider, kill those that do not exit in time. Idempotent."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_workdir and os.environ.get("RRAM_KEEP_CLUSTER") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._own_workdir = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __del__(self):
        procs = getattr(self, "procs", {})
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
