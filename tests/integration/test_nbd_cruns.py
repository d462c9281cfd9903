"""Runs of NBD requests served in C (ext/_nbdserve.pyx), with real tcp provider processes.

A deep-queue client sends READs or WRITEs back to back; the server's C loop serves the whole
run (its READs in one read_pages, its WRITEs page by page) and sends the replies at once.  The
export (test_nbd_creads.py's: BLOCKS blocks, a 1 MiB local budget) holds local, remote (two
providers, r=2), zero and never written pages; every reply is checked by checksum against a
model.  Declines in the middle of a run (a full local pool for
WRITEs, a stopped provider for READs) must still give every request its right reply: C answers
the requests before the decline, Python the rest.  fio's nbd engine, writing and verifying at
queue depth 32, is the real client.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import signal
import subprocess

import pytest

from rram.frontends.nbd import protocol as P

from ..unit.test_nbd_batching import Client
from .test_failures import wait_for
from .test_nbd_creads import BLOCKS, export_over_cluster

pytestmark = pytest.mark.integration
pytest.importorskip("rram._ext._nbdserve", reason="built without liblz4: no C request path")

PAGE = 4096
RUN = 32  # requests a burst: fio's qd32


def page(block: int, version: int) -> bytes:
    """Version 0 of every 7th block is a zero page (stored without a slot); others half-compressible."""
    if version == 0 and block % 7 == 0:
        return bytes(PAGE)
    rng = random.Random(block * 1_000_003 + version)
    return rng.randbytes(PAGE // 2) + bytes([version & 0xFF]) * (PAGE // 2)


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class Model:
    """The export as the client last wrote it: each block's version (absent: never written)."""

    def __init__(self):
        self.versions: dict[int, int] = {}

    def expect(self, block: int) -> bytes:
        v = self.versions.get(block)
        return bytes(PAGE) if v is None else page(block, v)


def write_burst(client: Client, model: Model, blocks: list[int]) -> None:
    """One send of a WRITE per block (distinct blocks: one run), then every reply."""
    burst = []
    for handle, block in enumerate(blocks, 1):
        v = model.versions.get(block, -1) + 1
        burst.append(client.request(P.NBD_CMD_WRITE, handle, block * PAGE, PAGE, page(block, v)))
        model.versions[block] = v
    sender = client.send(b"".join(burst))
    replies = sorted(client.reply({})[:2] for _ in blocks)
    sender.join()
    assert replies == [(h, 0) for h in range(1, len(blocks) + 1)], replies


def read_burst(client: Client, model: Model, blocks: list[int]) -> None:
    """One send of a READ per block, then every reply, checked by checksum."""
    client.sock.sendall(b"".join(client.request(P.NBD_CMD_READ, h, b * PAGE, PAGE) for h, b in enumerate(blocks, 1)))
    lengths = {h: PAGE for h in range(1, len(blocks) + 1)}
    seen = set()
    for _ in blocks:
        handle, error, data = client.reply(lengths)
        block = blocks[handle - 1]
        assert error == 0, f"error {error} on block {block}"
        assert digest(data) == digest(model.expect(block)), f"block {block} read back wrong"
        seen.add(handle)
    assert seen == set(lengths)


@contextlib.contextmanager
def nbd_over_cluster(tmp_path, structured: bool = False):
    with export_over_cluster(tmp_path, 2) as (c, store, srv, path):
        client = Client(path, structured=structured)
        try:
            yield c, store, srv, client
        finally:
            client.close()


def fill(client: Client, model: Model, blocks: range) -> None:
    order = list(blocks)
    for i in range(0, len(order), RUN):
        write_burst(client, model, order[i:i + RUN])


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_runs_of_mixed_pages_are_served_in_c(tmp_path, structured):
    with nbd_over_cluster(tmp_path, structured) as (_c, store, srv, client):
        model = Model()
        fill(client, model, range(BLOCKS - 256))  # the last 256 blocks stay never written
        s = store.stats()
        assert s["remote_pages"] > BLOCKS // 2, s["remote_pages"]
        nbd = srv.counters
        # the local pool filled up inside runs: C declined there, Python remotified and went on
        assert nbd["c_runs"] > 0 and nbd["c_run_declined"] > 0, nbd
        rng = random.Random(3)
        for r in range(40):
            blocks = rng.sample(range(BLOCKS), RUN)
            if r % 4 == 3:
                write_burst(client, model, blocks)
            else:
                read_burst(client, model, blocks)
        for i in range(0, BLOCKS, RUN):  # everything, in order: local, remote, zero and absent pages
            read_burst(client, model, list(range(i, i + RUN)))
        s, nbd = store.stats(), srv.counters
        assert s["c_remote_reads"] > BLOCKS // 2, s["c_remote_reads"]
        assert s["zero_pages"] >= BLOCKS // 16 and s["failed_gets"] > 0  # zero and absent pages were read
        read_declines = {k: v for k, v in s["c_declined_by"].items() if k.startswith("read_") and v}
        assert not read_declines, read_declines  # every READ run was served in C
        assert nbd["c_run_requests"] >= 30 * RUN + BLOCKS, nbd
        assert nbd["errors"] == 0 and nbd["requests"] >= nbd["c_run_requests"]


def test_a_provider_stopped_under_read_runs(tmp_path):
    """C's READ on the stopped provider times out: the run is declined whole (nothing sent),
    Python's failover serves it from the other copy, and C reads on from the live provider."""
    with nbd_over_cluster(tmp_path) as (c, store, srv, client):
        model = Model()
        fill(client, model, range(BLOCKS))
        rng = random.Random(11)
        c.kill("p0", signal.SIGSTOP)
        try:
            for _ in range(8):
                read_burst(client, model, rng.sample(range(BLOCKS), RUN))
            wait_for(lambda: store.stats()["providers"]["p0"] != "alive", 10, "p0 out of use")
            before = store.stats()["c_remote_reads"]
            for _ in range(8):
                read_burst(client, model, rng.sample(range(BLOCKS), RUN))
        finally:
            c.kill("p0", signal.SIGCONT)
        s, nbd = store.stats(), srv.counters
        assert s["c_declined_by"]["read_link_failed"] >= 1, s["c_declined_by"]
        assert nbd["c_run_declined"] >= 1 and nbd["runs"] >= 1, nbd  # declined in C, batched in Python
        assert s["c_remote_reads"] > before  # C reads again, from p1
        assert nbd["errors"] == 0


def test_fio_verifies_runs_at_queue_depth_32(tmp_path):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    if "nbd" not in subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout.split():
        pytest.skip("this fio has no nbd engine")
    with nbd_over_cluster(tmp_path) as (_c, store, srv, _client):
        sock = str(tmp_path / "nbd.sock")
        proc = subprocess.run(["fio", "--name=verify", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                               "--rw=randwrite", "--bs=4k", f"--size={BLOCKS * PAGE}", "--iodepth=32",
                               "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
                               "--buffer_compress_percentage=50", "--refill_buffers", "--output-format=json"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (job,) = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"]
        assert job["error"] == 0 and job["read"]["total_ios"] == BLOCKS, job["read"]["total_ios"]
        nbd, s = srv.counters, store.stats()
        assert nbd["c_runs"] > 0 and nbd["c_run_requests"] > BLOCKS // 2, nbd
        assert s["remote_pages"] > 0 and s["c_remote_reads"] > 0
        assert nbd["errors"] == 0
