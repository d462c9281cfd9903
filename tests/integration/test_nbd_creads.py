"""Remote pages read in C by the NBD server, with real tcp provider processes.

A queue-depth-1 NBD client (as the kernel's swap is) reads and overwrites single blocks of an
export whose pages live mostly on two providers (r=2); the server's C path reads the remote
pages itself (ext/_reqpath.pyx).  Every reply is checked against a model by checksum, while a
provider is killed (SIGKILL), stopped (SIGSTOP: C's READ times out, Python's hedged read serves
the request) or drained (the routes change under the C path: it must never read a stale copy).
"""
from __future__ import annotations

import contextlib
import hashlib
import random
import signal
import threading
import time

import pytest

from rram.cluster import open_store
from rram.frontends.nbd import protocol as P
from rram.frontends.nbd.backend import PageStoreBackend
from rram.frontends.nbd.server import NBDServer

from ..unit.test_nbd_batching import Client
from .conftest import tcp_cluster
from .test_failures import wait_for

pytestmark = pytest.mark.integration
pytest.importorskip("rram._ext._nbdserve", reason="built without liblz4: no C request path")

PAGE = 4096
BLOCKS = 2048  # 8 MiB of half-compressible pages against a 1 MiB local budget: most go remote
TIMING = {"heartbeat_interval": 0.2, "suspect_threshold": 0.6, "dead_threshold": 2.0}


def page(block: int, version: int) -> bytes:
    rng = random.Random(block * 1_000_003 + version)
    return rng.randbytes(PAGE // 2) + bytes([version & 0xFF]) * (PAGE // 2)


class Workload:
    """One qd1 NBD connection: random single-block READs (checked) and some WRITEs, in a thread."""

    def __init__(self, path: str, versions: dict[int, int], writes: bool):
        self.client = Client(path, structured=False)
        self.versions = versions
        self.writes = writes
        self.reads = self.bad = 0
        self.longest = 0.0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _request(self, cmd: int, block: int, data: bytes = b"") -> bytes:
        t = time.monotonic()
        self.client.sock.sendall(self.client.request(cmd, 7, block * PAGE, PAGE, data))
        _handle, error, got = self.client.reply({7: PAGE} if cmd == P.NBD_CMD_READ else {})
        self.longest = max(self.longest, time.monotonic() - t)
        assert error == 0, f"error {error} on block {block}"
        return got

    def _run(self) -> None:
        rng = random.Random(5)
        try:
            while not self._stop.is_set():
                block = rng.randrange(BLOCKS)
                if self.writes and rng.random() < 0.2:
                    v = self.versions[block] + 1
                    self._request(P.NBD_CMD_WRITE, block, page(block, v))
                    self.versions[block] = v
                    continue
                got = self._request(P.NBD_CMD_READ, block)
                self.reads += 1
                if hashlib.sha256(got).digest() != hashlib.sha256(page(block, self.versions[block])).digest():
                    self.bad += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)
        self.client.close()


@contextlib.contextmanager
def export_over_cluster(tmp_path, n_providers: int, **cluster):
    """An empty BLOCKS-block export, r=2 over tcp provider processes, served with the C path:
    (cluster, store, server, its socket path)."""
    with tcp_cluster(n_providers=n_providers, capacity="128MiB", replicas=2, workdir=str(tmp_path),
                     slab_size="1MiB", lease_grace=5.0, **TIMING, **cluster) as c, \
            open_store(c.config, name="req", local_budget=1 << 20) as store:  # sealed, the default
        backend = PageStoreBackend(store, store.create_pool(persistent=True), obj=1, size=BLOCKS * PAGE)
        with NBDServer(backend, c_requests=True) as srv:
            path = str(tmp_path / "nbd.sock")
            srv.listen_unix(path)
            srv.start()
            yield c, store, srv, path


@contextlib.contextmanager
def nbd_over_cluster(tmp_path, n_providers: int, **cluster):
    with export_over_cluster(tmp_path, n_providers, **cluster) as (c, store, _srv, path):
        client = Client(path, structured=False)
        for block in range(BLOCKS):  # qd1 writes: C stores them, Python moves them out
            client.sock.sendall(client.request(P.NBD_CMD_WRITE, 1, block * PAGE, PAGE, page(block, 0)))
            assert client.reply({})[1] == 0
        client.close()
        yield c, store, path, {b: 0 for b in range(BLOCKS)}


def _read_all(path: str, versions: dict[int, int]) -> None:
    client = Client(path, structured=False)
    try:
        for block in range(BLOCKS):
            client.sock.sendall(client.request(P.NBD_CMD_READ, 9, block * PAGE, PAGE))
            _h, error, got = client.reply({9: PAGE})
            assert error == 0 and got == page(block, versions[block]), block
    finally:
        client.close()


def test_remote_single_reads_in_c_verify(tmp_path):
    with nbd_over_cluster(tmp_path, 2) as (_c, store, path, versions):
        assert store.stats()["remote_pages"] > BLOCKS // 2
        with Workload(path, versions, writes=True) as w:
            time.sleep(2.0)
        assert w.error is None, w.error
        assert w.bad == 0 and w.reads > 100
        _read_all(path, versions)
        s = store.stats()
        assert s["c_remote_reads"] > BLOCKS // 2, s
        read_declines = {k: v for k, v in s["c_declined_by"].items() if k.startswith("read_") and v}
        assert not read_declines, read_declines
        spin = s["completion_spin"]  # every completion wait either polled (hit or miss) or slept
        assert set(spin) >= {"hits", "misses", "preempted", "probes", "us", "sleeps"}, spin
        assert spin["hits"] + spin["misses"] + spin["preempted"] + spin["sleeps"] > 0, spin


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["sigkill", "sigstop"])
def test_a_provider_killed_or_stopped_during_c_reads(tmp_path, sig):
    with nbd_over_cluster(tmp_path, 2) as (c, store, path, versions):
        with Workload(path, versions, writes=False) as w:
            time.sleep(0.5)
            c.kill("p0", sig)
            try:
                wait_for(lambda: store.stats()["providers"]["p0"] != "alive", 10, "p0 out of use")
                time.sleep(1.0)  # C reads go on from p1
            finally:
                if sig == signal.SIGSTOP:
                    c.kill("p0", signal.SIGCONT)
        assert w.error is None, w.error
        assert w.bad == 0 and w.reads > 100
        s = store.stats()
        declined = s["c_declined_by"]
        # C's READ on p0 failed (closed) or timed out (stopped): declined, then served by Python
        assert declined["read_link_failed"] >= 1, declined
        # a hung provider costs a request about the read timeout, not the time to declare it dead
        assert w.longest < store.remote.read_timeout + 1.0, w.longest
        _read_all(path, versions)
        assert store.stats()["c_remote_reads"] > s["c_remote_reads"]  # C reads again, from p1


def test_a_drain_under_c_reads_and_writes_serves_no_stale_page(tmp_path):
    with nbd_over_cluster(tmp_path, 3) as (_c, store, path, versions):
        victim = max(store.remote.links, key=lambda lk: store.remote.slabs_on(lk.index))
        with Workload(path, versions, writes=True) as w:
            time.sleep(0.3)
            store.drain(victim.name)
            wait_for(lambda: store.remote.slabs_on(victim.index) == 0, 60, f"{victim.name} drained")
            time.sleep(0.3)
        assert w.error is None, w.error
        assert w.bad == 0 and w.reads > 100
        s = store.stats()
        assert s["slabs_moved"] > 0 and s["c_remote_reads"] > 0
        _read_all(path, versions)
