"""Control connections over TLS 1.3 against real provider processes: plaintext, garbage and
dripping peers are logged and dropped while the provider keeps serving; clients refuse a
provider whose certificate is not the cluster CA's for that node's name; `rram keys` makes the
CA and the certificates for a new cluster.
"""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from rram import config as C
from rram import errors
from rram import tls as T
from rram.control import auth
from rram.control import messages as M
from rram.control.client import ProviderClient
from rram.testing.cluster import _ROOT

from .conftest import tcp_cluster

pytestmark = pytest.mark.integration

IO_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with tcp_cluster(n_providers=2, capacity="8MiB", workdir=str(tmp_path_factory.mktemp("ctls")), slab_size="1MiB",
                     io_timeout=IO_TIMEOUT) as c:
        yield c


def _closed(sock: socket.socket) -> bool:
    """True when the provider hangs up on us within a few seconds."""
    sock.settimeout(IO_TIMEOUT + 3)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except socket.timeout:
        return False


def _client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client (to drip it byte by byte)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="p0")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_plaintext_garbage_and_dripping_peers_are_dropped_and_the_provider_keeps_serving(cluster):
    node = cluster.config.node("p0")
    addr = (node.address, node.port)
    honest = cluster.client("p0", "honest")
    hello = M.encode(M.request("hello", 1, requester="x", role="requester", generation=1, nonce=auth.new_nonce()))
    plain, garbage, drip = (socket.create_connection(addr) for _ in range(3))
    try:
        plain.sendall(hello)  # an rram client without TLS
        garbage.sendall(os.urandom(2048))
        flight = _client_hello()
        t0 = time.monotonic()
        for i in range(len(flight)):  # a byte every 0.1 s would take far longer than the deadline
            try:
                drip.send(flight[i:i + 1])
            except OSError:
                break
            if time.monotonic() - t0 > IO_TIMEOUT + 2:
                break
            time.sleep(0.1)
        assert _closed(drip) and time.monotonic() - t0 < IO_TIMEOUT + 3  # one deadline for the whole handshake
        assert _closed(plain) and _closed(garbage)
        assert honest.heartbeat()["state"] == "serving"
        with cluster.client("p0", "newcomer") as c:
            assert c.alloc_slab(1 << 20).region.length == 1 << 20
    finally:
        for s in (plain, garbage, drip):
            s.close()
        honest.close()
    with open(cluster.log_path("p0")) as f:
        log = f.read()
    assert log.count("TLS handshake failed") >= 2, log[-3000:]
    assert "TLS handshake not finished in time" in log


def test_clients_refuse_a_provider_without_the_cluster_certificate_for_its_name(cluster, tmp_path):
    p0, p1 = cluster.config.node("p0"), cluster.config.node("p1")
    cred = cluster.credential("careful")
    # p1's name at p0's address: p0's certificate does not name p1 (a host that took p1's address)
    impostor = C.NodeConfig(name="p1", address=p0.address, port=p0.port, capacity=p1.capacity)
    with pytest.raises(errors.AuthError, match="certificate not accepted.*(mismatch|match)"):
        ProviderClient(impostor, cred, tls=cluster.tls).connect()
    # a client that trusts another CA does not trust this cluster's providers
    ca, _ = T.new_ca("other")
    (tmp_path / "ca.pem").write_bytes(ca)
    with pytest.raises(errors.AuthError, match="certificate not accepted"):
        ProviderClient(p0, cred, tls=T.client_context(str(tmp_path / "ca.pem"))).connect()
    # a plaintext client gets no answer it could mistake for the protocol
    with pytest.raises(errors.RramError):
        ProviderClient(p0, cred, tls=None, timeout=IO_TIMEOUT + 2).connect()
    with cluster.client("p0", "after") as c:  # still serving
        assert c.heartbeat()["state"] == "serving"


def test_keys_init_makes_a_tls_cluster(tmp_path):
    cfg_path = tmp_path / "cluster.yaml"
    cfg_path.write_text("name: lab\nsecret_file: master.key\ntls_dir: tls\nnodes:\n"
                        "  - {name: mem1, address: 127.0.0.1, port: 7777, capacity: 1GiB}\n"
                        "  - {name: mem2, address: 127.0.0.1, port: 7778, capacity: 1GiB}\n")
    env = dict(os.environ, PYTHONPATH=_ROOT)
    rc = subprocess.run([sys.executable, "-m", "rram", "keys", "init", "--config", str(cfg_path)],
                        capture_output=True, text=True, env=env, timeout=60)
    assert rc.returncode == 0, rc.stderr
    assert "cluster CA and provider certificates" in rc.stdout
    tls_dir = tmp_path / "tls"
    for name in ("ca.pem", "ca-key.pem", "mem1.pem", "mem1-key.pem", "mem2.pem", "mem2-key.pem"):
        assert (tls_dir / name).exists(), name
    for secret in ("ca-key.pem", "mem1-key.pem"):
        assert (tls_dir / secret).stat().st_mode & 0o077 == 0, secret
    # each provider's certificate verifies against the CA for its name
    cfg = C.load(cfg_path)
    server = T.provider_context(cfg, "mem1")
    client = T.cluster_client_context(cfg)
    a, b = socket.socketpair()
    with server.wrap_socket(a, server_side=True, do_handshake_on_connect=False) as s, \
            client.wrap_socket(b, server_hostname="mem1", do_handshake_on_connect=False) as c:
        t = threading.Thread(target=s.do_handshake)
        t.start()
        c.do_handshake()
        t.join()
        assert c.version() == "TLSv1.3"
    # a plaintext cluster turns TLS on later: init again makes what is missing, the master key stays
    key = (tmp_path / "master.key").read_bytes()
    shutil.rmtree(tls_dir)
    rc = subprocess.run([sys.executable, "-m", "rram", "keys", "init", "--config", str(cfg_path)],
                        capture_output=True, text=True, env=env, timeout=60)
    assert rc.returncode == 0 and "master key" not in rc.stdout, rc.stdout + rc.stderr
    assert (tls_dir / "mem2.pem").exists() and (tmp_path / "master.key").read_bytes() == key
    # a newcomer provider gets its certificate with `rram keys add NODE --role provider`
    cfg_path.write_text(cfg_path.read_text() + "  - {name: mem3, address: 10.0.0.13, port: 7777, capacity: 1GiB}\n")
    rc = subprocess.run([sys.executable, "-m", "rram", "keys", "add", "mem3", "--role", "provider", "--config",
                         str(cfg_path)], capture_output=True, text=True, env=env, timeout=60)
    assert rc.returncode == 0, rc.stderr
    assert (tls_dir / "mem3.pem").exists() and (tls_dir / "mem3-key.pem").exists()
