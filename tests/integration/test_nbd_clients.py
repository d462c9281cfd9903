"""The NBD server against real clients: nbdinfo, nbdcopy, qemu-img, qemu-io, fio.

Each client runs against two servers: an in-process NBDServer over a MemoryBackend (the
protocol alone), and `rram requester` serving a persistent pool of the page store on a
LocalCluster of two real tcp provider processes, with a local budget small enough that most
of the export lives in the providers.  Data is checked with sha256, qemu's pattern reads
and fio's crc32c verify.
"""
from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest

from rram.frontends.nbd.backend import MemoryBackend
from rram.frontends.nbd.server import NBDServer
from rram.testing.cluster import _ROOT

from .conftest import tcp_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SIZE = 32 << 20
MiB = 1 << 20
READY_TIMEOUT = 20.0
CLIENT_TIMEOUT = 60


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: libnbd-bin, qemu-utils, fio)")
    return path


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


# -- servers -----------------------------------------------------------------------------------

class Served:
    """Where a running server listens, as URIs that libnbd, qemu and fio understand."""

    def __init__(self, sock: str, tcp: tuple[str, int], kind: str, server=None, cluster=None):
        self.sock, self.tcp, self.kind, self.server, self.cluster = sock, tcp, kind, server, cluster
        self.metrics: str | None = None  # host:port of the requester's Prometheus /metrics

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def tcp_uri(self) -> str:
        return f"nbd://{self.tcp[0]}:{self.tcp[1]}/"


def _memory_server():
    tmp = tempfile.mkdtemp(prefix="rram-nbd-")  # short: unix socket paths are limited to 108 bytes
    server = NBDServer(MemoryBackend(SIZE), handshake_timeout=2.0)
    try:
        sock = server.listen_unix(os.path.join(tmp, "nbd.sock"))
        tcp = server.listen_tcp("127.0.0.1", 0)
        server.start()
        yield Served(sock, tcp, "memory", server)
    finally:
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _store_server(n_providers: int = 2):
    tmp = tempfile.mkdtemp(prefix="rram-nbd-")
    sock = os.path.join(tmp, "nbd.sock")
    with tcp_cluster(n_providers=n_providers, capacity="48MiB", workdir=tmp, slab_size="1MiB",
                      verbose=False, requester={"local_budget": "2MiB"}) as cluster:
        log_path = os.path.join(tmp, "requester.log")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rram.frontends.requester", "--config", cluster.config_path, "--name", "req",
                 "--export-size", str(SIZE), "--socket", sock, "--listen", "127.0.0.1:0", "--no-mlock",
                 "--metrics-port", "0"],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=env)
        try:
            line = _ready_line(proc, log_path)
            host, port = next(w for w in line.split() if w.startswith("listen=")).split("=", 1)[1].rsplit(":", 1)
            served = Served(sock, (host, int(port)), "store", cluster=cluster)
            served.metrics = next(w for w in line.split() if w.startswith("metrics=")).split("=", 1)[1]
            yield served
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, _tail(log_path)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _ready_line(proc, log_path) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if sel.select(timeout=0.1):
            line = proc.stdout.readline()
            if line.startswith("rram requester req ready "):
                return line
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"requester not ready (status {proc.poll()}):\n{_tail(log_path)}")


def _tail(path) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-30:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module", params=["memory", "store"])
def served(request):
    yield from (_memory_server() if request.param == "memory" else _store_server())


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A random image the size of the export, half compressible (text), half not."""
    rng = np.random.default_rng(42)
    raw = bytearray(rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    raw[: SIZE // 2] = (b"rram keeps pages in remote memory. " * (SIZE // 70 + 1))[: SIZE // 2]
    path = tmp_path_factory.mktemp("img") / "image.raw"
    path.write_bytes(raw)
    return path, hashlib.sha256(raw).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


# -- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["unix", "tcp"])
def test_nbdinfo_size_and_flags(served, via):
    need("nbdinfo")
    info = json.loads(run("nbdinfo", "--json", served.uri if via == "unix" else served.tcp_uri).stdout)
    (export,) = info["exports"]
    assert info["protocol"] == "newstyle-fixed"
    assert export["export-size"] == SIZE
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert (export["block_size_minimum"], export["block_size_preferred"]) == (1, 4096)


@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_in_and_out(served, image, tmp_path, connections):
    need("nbdcopy")
    src, digest = image
    before = served.server.counters["connections"] if served.server else 0
    run("nbdcopy", f"--connections={connections}", f"--threads={connections}", "--requests=16", str(src), served.uri)
    out = tmp_path / "out.raw"
    run("nbdcopy", f"--connections={connections}", f"--threads={connections}", served.uri, str(out))
    assert sha256_file(out) == digest
    if served.server and connections > 1:  # multi-conn was used: several connections per copy
        assert served.server.counters["connections"] - before >= 2 * connections
    if served.cluster:  # the local budget is 2 MiB: most of the image went to the providers
        used = sum(_provider_stats(served.cluster, name)["used"] for name in served.cluster.providers)
        assert used >= 8 * MiB


def _provider_stats(cluster, name: str) -> dict:
    from rram.control.client import ProviderClient

    client = ProviderClient(cluster.config.node(name), cluster.credential("nbd-test-observer", "operator"),
                            tls=cluster.tls)
    try:
        client.connect()
        return client.stats()
    finally:
        client.close()


def test_qemu_img_convert_and_compare(served, image, tmp_path):
    need("qemu-img")
    src, digest = image
    # scramble the export first so that the copy has something to overwrite
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {SIZE}", served.uri)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", str(src), served.uri)
    assert "identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), served.uri).stdout
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.tcp_uri, str(out))
    assert sha256_file(out) == digest


def test_qemu_io_patterns_zeroes_discard_unaligned(served):
    need("qemu-io")
    cmds = [
        "write -P 0xab 0 1M", "read -P 0xab 0 1M",
        "write -z 1M 64k", "read -P 0 1M 64k",                          # WRITE_ZEROES, whole pages
        "write -P 0xcd 2M 1M", "write -z 2098152 100", "read -P 0 2098152 100",  # partial zeroing (RMW)
        "read -P 0xcd 2M 1000", "read -P 0xcd 2098252 947476",
        "discard 4M 64k", "write -P 0x11 4M 64k", "read -P 0x11 4M 64k",    # TRIM, then rewrite
        "write -P 0x22 100 1000", "read -P 0x22 100 1000", "read -P 0xab 1100 1000", "read -P 0xab 0 100",
        "write -P 0x33 -f 8M 4k", "flush", "read -P 0x33 8M 4k",            # FUA, FLUSH
        f"write -P 0x44 {SIZE - 4096} 4096", f"read -P 0x44 {SIZE - 4096} 4096",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    proc = run(*args, served.uri)
    assert "failed" not in proc.stdout + proc.stderr
    # and the check above can fail: a wrong pattern is reported
    bad = run("qemu-io", "-f", "raw", "-c", "read -P 0x99 0 4k", served.uri, check=False)
    assert "Pattern verification failed" in bad.stdout


def test_qemu_io_beyond_the_end_is_refused(served):
    need("qemu-io")
    proc = run("qemu-io", "-f", "raw", "-c", f"read 0 {SIZE + 4096}", served.uri, check=False)
    assert "read failed" in proc.stdout + proc.stderr or "Input/output error" in proc.stdout + proc.stderr


@pytest.mark.parametrize("served", ["store"], indirect=True)  # only `rram requester` has /metrics
def test_requester_metrics_count_nbd_requests_and_store_gets(served):
    need("nbdcopy")
    run("nbdcopy", served.uri, os.devnull)  # reads every block
    with urllib.request.urlopen(f"http://{served.metrics}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("rram_requester_")}
    assert values["rram_requester_nbd_requests"] > 0
    assert values["rram_requester_nbd_errors"] == 0
    assert values["rram_requester_gets"] >= SIZE // 4096


def test_fio_nbd_engine_randwrite_verify(served):
    need("fio")
    if "nbd" not in run("fio", "--enghelp").stdout.split():
        pytest.skip("this fio was built without the nbd engine (libnbd)")
    proc = run("fio", "--name=nbd-verify", "--ioengine=nbd", f"--uri={served.uri}", "--rw=randwrite", "--bs=4k",
               "--size=8M", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
               "--randrepeat=1", "--verify_state_save=0", "--output-format=json")
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    (job,) = result["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * MiB and job["read"]["io_bytes"] == 8 * MiB  # written, read back


def test_a_provider_killed_during_writes_loses_no_acknowledged_page(image, tmp_path):
    """Three providers, two replicas: SIGKILL one while nbdcopy writes; every byte reads back."""
    need("nbdcopy")
    src, digest = image
    server = _store_server(n_providers=3)
    served = next(server)
    try:
        run("nbdcopy", str(src), served.uri)  # the providers hold pages from here on
        copier = subprocess.Popen(["nbdcopy", "--flush", "--requests=16", str(src), served.uri],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(0.05)  # the second copy is under way (it takes a few hundred ms)
            mid_copy = copier.poll() is None
            served.cluster.kill("p1", signal.SIGKILL)
            out, _ = copier.communicate(timeout=CLIENT_TIMEOUT)
        finally:
            if copier.poll() is None:
                copier.kill()
                copier.communicate()
        assert copier.returncode == 0, out
        print(f"p1 killed {'during' if mid_copy else 'after'} the second copy")
        back = tmp_path / "back.raw"
        run("nbdcopy", served.uri, str(back))  # reads fail over to the surviving replicas
        assert sha256_file(back) == digest
    finally:
        server.close()
