"""Attacks on a real provider process over loopback: what a peer can make it hold is bounded.

The attackers dial from other loopback addresses (127.0.0.2, ...) so that the caps per peer
address apply to them and not to the honest requester on 127.0.0.1.  The provider's RSS is
read from /proc while it is under attack: it must stay under capacity + io_budget + a fixed
overhead (README, "Security model").
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
import zlib

import numpy as np
import pytest

from rram import errors, transport
from rram.control import messages as M
from rram.control.client import ProviderClient
from rram.transport import tcp, wire

from .conftest import tcp_cluster

pytestmark = pytest.mark.integration

MiB = 1 << 20
#: the interpreter, numpy, the extensions, a thread per admitted connection (README)
FIXED_OVERHEAD = 160 * MiB
IO_TIMEOUT = 2.0
LIMITS = {"max_connections": 64, "max_connections_per_peer": 16, "max_handshakes": 32,
          "max_data_connections": 4, "io_budget": "96MiB"}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.fixture
def provider(tmp_path):
    with tcp_cluster(n_providers=1, capacity="64MiB", workdir=str(tmp_path), slab_size="1MiB", replicas=1,
                     lease_grace=1.0, io_timeout=IO_TIMEOUT, limits=LIMITS) as c:
        yield c


def dial(addr, source: str) -> socket.socket | None:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(2)
    try:
        s.connect(addr)
    except OSError:
        s.close()
        return None
    return s


class Requester:
    """An honest requester: control session, one data connection, one lease, checksummed I/O."""

    def __init__(self, cluster, name="honest"):
        self.client = ProviderClient(cluster.config.node("p0"), cluster.credential(name), tls=cluster.tls)
        self.client.connect()
        self.ep = transport.requester_transport("tcp").endpoint()
        self.params = self.client.connect_data(self.ep.local_params())
        self.ep.connect(self.params)
        self.lease = self.client.alloc_slab(MiB)
        self.buf = np.zeros(2 * 64 << 10, np.uint8)
        self.lkey = self.ep.register_local(self.buf.ctypes.data, self.buf.nbytes)

    def round_trip(self, seed: int) -> None:
        """WRITE 64 KiB, READ it back, compare checksums."""
        n = 64 << 10
        self.buf[:n] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
        want = zlib.crc32(self.buf[:n])
        for opcode, local in ((transport.OP_WRITE, 0), (transport.OP_READ, n)):
            ops = transport.new_ops(1)
            ops[0] = (self.buf.ctypes.data + local, self.lease.region.addr, n, self.lkey,
                      self.lease.region.rkey, opcode, 0)
            self.ep.post(ops, seed)
            comp = transport.new_completions(1)
            assert self.ep.poll(comp, 10.0) == 1 and comp[0]["status"] == 0
        assert zlib.crc32(self.buf[n:]) == want

    def close(self):
        self.ep.close()
        self.client.close()


def wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _drip(socks, stop: threading.Event, frames) -> None:
    """Send each socket its frame one byte at a time, a byte per socket every 0.2 s."""
    sent = [0] * len(socks)
    while not stop.wait(0.2):
        for i, s in enumerate(socks):
            if s is None or sent[i] >= len(frames[i]):
                continue
            try:
                s.send(frames[i][sent[i] : sent[i] + 1])
                sent[i] += 1
            except OSError:
                sent[i] = len(frames[i])  # dropped by the provider


def test_slow_drip_flood_is_bounded_and_the_provider_keeps_serving(provider):
    pid = provider.procs["p0"].pid
    early = Requester(provider, "early")  # authenticated before the flood: must keep working
    data_addr = (early.params["host"], early.params["port"])
    control_addr = (provider.config.node("p0").address, provider.config.node("p0").port)
    before = rss(pid)
    # one attacking host: 200 connections to each port, each announcing a frame and dripping it
    ctl_frame = M.LENGTH.pack(4000) + b"x" * 4000  # the largest frame allowed before auth
    data_frame = wire.hello(bytes(wire.TOKEN_SIZE), bytes(wire.MAC_SIZE))
    socks = [dial(control_addr, "127.0.0.2") for _ in range(200)] + [dial(data_addr, "127.0.0.2") for _ in range(200)]
    # and many hosts, a few connections each: the total caps hold
    socks += [dial(addr, f"127.0.0.{10 + i}") for i in range(40) for addr in (control_addr, data_addr)
              for _ in range(2)]
    frames = [ctl_frame] * 200 + [data_frame] * 200 + [ctl_frame, ctl_frame, data_frame, data_frame] * 40
    stop = threading.Event()
    dripper = threading.Thread(target=_drip, args=(socks, stop, frames), daemon=True)
    dripper.start()
    try:
        time.sleep(1.0)
        peak = rss(pid)
        assert peak < 64 * MiB + 96 * MiB + FIXED_OVERHEAD, (before, peak)
        assert threads(pid) <= LIMITS["max_connections"] + 16
        for seed in range(5):
            early.round_trip(seed)
        st = early.client.stats()  # a newcomer may be refused while the handshake slots are full
        assert st["admission"]["refused"] >= 300  # most of the flood never got a slot
        assert st["admission"]["connections"] <= LIMITS["max_connections"]
        # past the whole-handshake deadline every dripping connection is gone, whatever it sent
        wait_for(lambda: early.client.stats()["admission"]["handshakes"] == 0, IO_TIMEOUT + 8)
        late = Requester(provider, "late")  # a newcomer gets in again
        late.round_trip(7)
        late.close()
        assert rss(pid) < 64 * MiB + 96 * MiB + FIXED_OVERHEAD
    finally:
        stop.set()
        dripper.join()
        for s in socks:
            if s is not None:
                s.close()
        early.close()
    with open(provider.log_path("p0")) as f:
        log = f.read()
    assert "refused a control connection from 127.0.0.2: 16 connections from 127.0.0.2" in log
    assert log.count("refused a ") < 20  # rate-limited: hundreds refused, a line a second at most


def test_one_peer_cannot_take_every_slot_from_an_honest_requester(provider):
    control_addr = (provider.config.node("p0").address, provider.config.node("p0").port)
    hogs = [dial(control_addr, "127.0.0.3") for _ in range(40)]  # silent: never say hello
    try:
        time.sleep(0.3)
        honest = Requester(provider)  # from 127.0.0.1: its own per-peer allowance
        honest.round_trip(1)
        honest.close()
        told = []  # the refused ones were told why at once; the admitted wait for their deadline
        for s in hogs:
            s.setblocking(False)
            try:
                told.append(s.recv(4096))
            except BlockingIOError:
                pass
        assert len(told) == 40 - LIMITS["max_connections_per_peer"]
        msg = M.Decoder("reply").feed(told[0])[0]
        assert msg["error"]["code"] == "limit" and "max_connections_per_peer" in msg["error"]["message"]
    finally:
        for s in hogs:
            s.close()


def test_capacity_bypass_with_many_tokens_and_big_batches_is_refused(provider):
    pid = provider.procs["p0"].pid
    r = Requester(provider, "greedy")  # a 1 MiB lease, one data connection (token 1 of 4)
    params = [r.params]
    refused = 0
    for _ in range(11):
        try:
            params.append(r.client.connect_data({}))
        except errors.RramError as exc:
            assert "max_data_connections" in str(exc)
            refused += 1
    assert len(params) == LIMITS["max_data_connections"] and refused == 8
    # a valid batch of 64 WRITEs of 1 MiB each (all onto the one leased MiB), on every connection
    region = r.lease.region
    descs = np.zeros(64, wire.WIRE_OP)
    descs["remote_addr"], descs["length"], descs["rkey"], descs["opcode"] = region.addr, MiB, region.rkey, 1
    page = np.full(MiB, 0x5A, np.uint8).tobytes()
    socks, frames = [], []
    try:
        for p in params[1:]:
            s = socket.create_connection((p["host"], p["port"]))
            key = tcp.handshake(s, bytes.fromhex(p["token"]), bytes.fromhex(p["session_secret"]))
            socks.append(s)
            frames.append(wire.request(1, descs, page * 64, key))
        results = [None] * len(socks)
        peaks = []

        def attack(i, s):
            try:
                s.sendall(frames[i])
                results[i] = s.recv(4096)
            except OSError as exc:
                results[i] = exc

        def watch(stop):  # samples at least once even if the attack is over within one period
            peaks.append(rss(pid))
            while not stop.wait(0.05):
                peaks.append(rss(pid))
            peaks.append(rss(pid))

        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(stop,))
        watcher.start()
        attackers = [threading.Thread(target=attack, args=(i, s)) for i, s in enumerate(socks)]
        for t in attackers:
            t.start()
        for t in attackers:
            t.join(30)
        stop.set()
        watcher.join()
        done = [wire.parse_header(res) for res in results if isinstance(res, bytes) and len(res) >= 32]
        done = [h for h in done if h.type == wire.COMPLETION and h.status == 0]
        assert 1 <= len(done) < len(socks), results  # three 64 MiB frames at once do not fit a 96 MiB budget
        assert max(peaks) < 64 * MiB + 96 * MiB + FIXED_OVERHEAD
        with open(provider.log_path("p0")) as f:  # the refused peers were cut mid-send: the log says why
            assert "does not fit the provider's I/O budget" in f.read()
    finally:  # a failed assertion must not leave the sockets to a later test's garbage collection
        for s in socks:
            s.close()
    # the honest path on the same session still works, and the budget came back
    r.round_trip(3)

    def budget_back():  # only the honest connection holds any: its 2 x 64 KiB
        st = r.client.stats()["transport_stats"]
        return st["io_budget_free"] == st["io_budget"] - 2 * (64 << 10)

    wait_for(budget_back, 5)
    r.close()


def test_a_requester_that_stops_reading_is_dropped_and_sigterm_does_not_hang(provider):
    r = Requester(provider, "stalled")
    # READ batches whose completions nobody reads: the provider's replies fill the socket
    s = socket.create_connection((r.params["host"], r.params["port"]))
    p = r.client.connect_data({})
    key = tcp.handshake(s, bytes.fromhex(p["token"]), bytes.fromhex(p["session_secret"]))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    descs = np.zeros(64, wire.WIRE_OP)
    descs["remote_addr"], descs["length"], descs["rkey"] = r.lease.region.addr, 16 << 10, r.lease.region.rkey
    s.setblocking(False)
    for i in range(400):
        try:
            s.send(wire.request(1, descs, key=key, seq=i))
        except BlockingIOError:
            break
    time.sleep(0.5)  # the provider is now blocked sending a completion nobody reads
    assert r.client.stats()["transport_stats"]["connections"] == 2
    # SIGTERM now: the blocked reply gives up at once, nothing waits for the peer to read
    t0 = time.monotonic()
    provider.kill("p0", signal.SIGTERM)
    assert provider.procs["p0"].returncode == 0
    assert time.monotonic() - t0 < 2.5
    s.close()
    r.ep.close()
    r.client.close()


def test_a_stalled_reader_is_dropped_after_the_send_deadline(provider):
    r = Requester(provider, "stalled")
    s = socket.create_connection((r.params["host"], r.params["port"]))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    p = r.client.connect_data({})
    key = tcp.handshake(s, bytes.fromhex(p["token"]), bytes.fromhex(p["session_secret"]))
    descs = np.zeros(64, wire.WIRE_OP)
    descs["remote_addr"], descs["length"], descs["rkey"] = r.lease.region.addr, 16 << 10, r.lease.region.rkey
    s.setblocking(False)
    for i in range(400):
        try:
            s.send(wire.request(1, descs, key=key, seq=i))
        except BlockingIOError:
            break
    deadline = time.monotonic() + IO_TIMEOUT + 3
    while r.client.stats()["transport_stats"]["connections"] != 1:  # only the honest one left
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r.round_trip(9)  # the same session's other connection never noticed
    s.close()
    r.close()


def test_lease_expiry_is_not_stalled_by_a_requester_that_stopped_reading(tmp_path):
    # a long send deadline: only the cancel on shut can free the provider's blocked reply in time
    with tcp_cluster(n_providers=1, capacity="64MiB", workdir=str(tmp_path), slab_size="1MiB", replicas=1,
                     lease_grace=1.0, io_timeout=30.0, limits=LIMITS) as cluster:
        stalled, other = Requester(cluster, "stalled"), Requester(cluster, "other")
        p = stalled.client.connect_data({})
        s = socket.create_connection((p["host"], p["port"]))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        key = tcp.handshake(s, bytes.fromhex(p["token"]), bytes.fromhex(p["session_secret"]))
        descs = np.zeros(64, wire.WIRE_OP)
        descs["remote_addr"], descs["length"] = stalled.lease.region.addr, 16 << 10
        descs["rkey"] = stalled.lease.region.rkey
        s.setblocking(False)
        for i in range(400):
            try:
                s.send(wire.request(1, descs, key=key, seq=i))
            except BlockingIOError:
                break
        time.sleep(0.5)  # the provider is blocked replying to a peer that does not read
        for r in (stalled, other):  # both vanish without bye: their leases wait out the grace
            r.client._hangup()
        t0 = time.monotonic()
        with cluster.client("p0", "admin", "operator") as admin:
            wait_for(lambda: admin.stats()["used"] == 0, 6.0)
        assert time.monotonic() - t0 < 1.0 + 5.0  # grace + reaper tick, not the 30 s send deadline
        s.close()
        for r in (stalled, other):
            r.ep.close()
            r.client.close()
