"""Fuzz a real provider process through its sockets, where in-process targets cannot reach the
state of its connection loops: mutated control frames before and after authentication (inside
TLS, as LocalCluster runs it; some plaintext at the TLS handshake), and data
frames after a proven HELLO (raw mutations, and mutated batches signed with the connection's key
so that they reach execution).  Every input goes on its own connection.  Oracle: the provider
stays up, never logs an internal error, and an honest requester (control session, lease, tcp
data connection, checksummed WRITE and READ) keeps working.

RRAM_FUZZ_LIVE_RUNS sets the inputs per kind (default 100: the CI run; scripts/fuzz.sh --long
runs more).
"""
from __future__ import annotations

import os
import random
import socket

import numpy as np
import pytest

from rram.control import auth
from rram.control import messages as M
from rram.transport import wire
from rram.transport.base import OP_READ, OP_WRITE
from tests.fuzz import driver
from tests.integration.conftest import tcp_cluster
from tests.integration.test_hostile_peers import Requester

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

RUNS = int(os.environ.get("RRAM_FUZZ_LIVE_RUNS", "100"))
CHECK_EVERY = 20
BAD_LOG = ("Traceback", "internal error", "failed; dropping it")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with tcp_cluster(n_providers=1, capacity="32MiB", workdir=str(tmp_path_factory.mktemp("live")),
                     slab_size="1MiB", replicas=1, lease_grace=1.0, io_timeout=1.0) as c:
        yield c


def drain(sock: socket.socket) -> None:
    """Read what the provider answers until it closes (it drops a bad peer) or goes quiet."""
    sock.settimeout(3)
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:  # a timeout, a reset, or a TLS alert: the provider hung up on us
        pass


def recv_frame(sock: socket.socket, dec: M.Decoder) -> dict:
    while True:
        got = dec.feed(sock.recv(1 << 16) or b"")
        if got:
            return got[0]


def control(cluster, plaintext: bool = False) -> socket.socket:
    """A control connection to p0 that has done nothing yet: inside TLS as a client's would be
    (the cluster's CA; LocalCluster runs TLS), or plaintext bytes at the TLS port."""
    node = cluster.config.node("p0")
    sock = socket.create_connection((node.address, node.port), timeout=5)
    if cluster.tls is None or plaintext:
        return sock
    return cluster.tls.wrap_socket(sock, server_hostname=node.name)


def authenticated(cluster, name: str) -> socket.socket:
    """A control connection that passed hello/auth as requester ``name``."""
    cred = cluster.credential(name)
    sock = control(cluster)
    dec = M.Decoder("reply")
    nonce = auth.new_nonce()
    sock.sendall(M.encode(M.request("hello", 1, requester=name, role="requester", generation=cred.generation,
                                    nonce=nonce)))
    challenge = recv_frame(sock, dec)["challenge"]
    sock.sendall(M.encode(M.request("auth", 2, mac=auth.requester_mac(cred.key, challenge, nonce, name))))
    welcome = recv_frame(sock, dec)
    assert welcome["ok"], welcome
    return sock


class Checker:
    def __init__(self, cluster):
        self.cluster = cluster
        self.n = 0

    def __call__(self, force: bool = False) -> None:
        self.n += 1
        assert self.cluster.alive("p0"), self.cluster.log_tail("p0")
        if not force and self.n % CHECK_EVERY:
            return
        with open(self.cluster.log_path("p0")) as f:
            log = f.read()
        for bad in BAD_LOG:
            assert bad not in log, f"provider logged {bad!r}:\n{self.cluster.log_tail('p0', 60)}"
        honest = Requester(self.cluster, f"honest{self.n}")
        try:
            honest.round_trip(self.n)
        finally:
            honest.close()


def test_control_frames_before_authentication(cluster):
    rng, seeds, check = random.Random(1), driver.corpus("control_frames"), Checker(cluster)
    for _ in range(RUNS):
        data = driver.mutate(rng, rng.choice(seeds), seeds)
        with control(cluster, plaintext=rng.random() < 0.2) as s:  # some at the TLS layer itself
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            drain(s)
        check()
    check(force=True)


def test_control_frames_after_authentication(cluster):
    rng, check = random.Random(2), Checker(cluster)
    seeds = [s for s in driver.corpus("control_frames") if b'"type":"hello"' not in s]
    for i in range(RUNS):
        data = b"".join(driver.mutate(rng, rng.choice(seeds), seeds) for _ in range(rng.randrange(1, 4)))
        # a name per input: a dropped session lingers for lease_grace, and sessions per name are capped
        with authenticated(cluster, f"fuzzer{i}") as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:  # the provider dropped us already (EPIPE, ECONNRESET, ENOTCONN): fine
                pass
            drain(s)
        check()
    check(force=True)


def signed_batch(rng: random.Random, lease, key: bytes, seq: int) -> bytes:
    """A batch of ops in and around the lease, of any opcode and length, validly signed."""
    n = rng.randrange(1, 6)
    ops = np.zeros(n, dtype=wire.WIRE_OP)
    payload = 0
    for i in range(n):
        opcode = rng.choice((OP_READ, OP_WRITE, OP_WRITE, rng.randrange(256)))
        length = rng.choice((0, 1, 4096, lease.region.length, wire.MAX_OP_LENGTH + 1, rng.randrange(1 << 16)))
        addr = lease.region.addr + rng.choice((0, 1, lease.region.length - 4096, lease.region.length,
                                               -4096, rng.randrange(1 << 20)))
        rkey = lease.region.rkey ^ rng.choice((0, 0, 0, 1, 1 << 13))
        ops[i] = (addr % (1 << 64), length, rkey, opcode, (0,) * 7)
        if opcode == OP_WRITE:
            payload += length
    if payload > 1 << 20 or rng.random() < 0.1:
        payload = rng.randrange(1 << 12)  # a payload that does not match the WRITE lengths
    return wire.request(rng.randrange(1 << 64), ops, rng.randbytes(payload), key=key, seq=seq)


def test_data_frames_after_a_proven_hello(cluster):
    from rram.control.client import ProviderClient
    from rram.transport import tcp

    rng, check = random.Random(3), Checker(cluster)
    seeds = driver.corpus("tcp_server")
    client = ProviderClient(cluster.config.node("p0"), cluster.credential("data-fuzzer"), tls=cluster.tls)
    client.connect()
    lease = client.alloc_slab(1 << 20)
    params = client.connect_data({})
    token, secret = bytes.fromhex(params["token"]), bytes.fromhex(params["session_secret"])
    try:
        for _ in range(RUNS):
            with socket.create_connection((params["host"], params["port"]), timeout=5) as s:
                key = tcp.handshake(s, token, secret)
                if rng.random() < 0.5:
                    data = b"".join(signed_batch(rng, lease, key, seq) for seq in range(rng.randrange(1, 5)))
                else:
                    data = driver.mutate(rng, rng.choice(seeds), seeds)
                try:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                drain(s)
            check()
        check(force=True)
    finally:
        client.close()
