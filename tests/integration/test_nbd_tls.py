"""NBD over TLS (NBD_OPT_STARTTLS, FORCEDTLS) against real clients: libnbd's nbdinfo and nbdcopy,
qemu-img and qemu-io, and hand-driven sockets for what no well-behaved client sends.

Certificates come from ``rram keys tls`` (GnuTLS naming) signed by a LocalCluster's CA; the
export requires a client certificate from that CA.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from rram.frontends.nbd import protocol as P
from rram.frontends.nbd.backend import MemoryBackend
from rram.frontends.nbd.server import NBDServer
from rram.frontends.requester import nbd_tls_context
from rram.testing.cluster import _ROOT

from .conftest import tcp_cluster
from .test_nbd_clients import _ready_line, _tail, need, run, sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SIZE = 32 << 20
MiB = 1 << 20


def rram_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "rram", *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tempfile.mkdtemp(prefix="rram-nbdtls-")  # short: unix socket paths are limited to 108 bytes
    with tcp_cluster(n_providers=2, capacity="48MiB", workdir=tmp, slab_size="1MiB", verbose=False,
                     requester={"local_budget": "2MiB"}) as c:
        yield c
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def certs(cluster):
    """``rram keys tls``: the export's directory, a client's, and a directory with only the CA."""
    out = {k: os.path.join(cluster.workdir, k) for k in ("server", "client", "anonymous", "stranger")}
    for name, side, extra in (("req", "--server", ["--host", "127.0.0.1", "--host", "localhost"]),
                              ("laptop", "--client", [])):
        rc = rram_cli("keys", "tls", name, side, "--out", out[side[2:]], "--config", cluster.config_path, *extra)
        assert rc.returncode == 0, rc.stderr
        assert "certificate for" in rc.stdout
    os.makedirs(out["anonymous"])
    shutil.copy(os.path.join(out["client"], "ca-cert.pem"), out["anonymous"])
    # a client certificate from another CA
    from rram import tls as T

    ca, ca_key = T.new_ca("elsewhere")
    cert, key = T.issue(ca, ca_key, "mallory", client=True)
    os.makedirs(out["stranger"])
    shutil.copy(os.path.join(out["client"], "ca-cert.pem"), out["stranger"])
    for fname, data in (("client-cert.pem", cert), ("client-key.pem", key)):
        with open(os.path.join(out["stranger"], fname), "wb") as f:
            f.write(data)
    return out


@pytest.fixture
def memory_server(certs):
    server = NBDServer(MemoryBackend(SIZE), handshake_timeout=2.0, tls=nbd_tls_context(certs["server"]))
    tmp = tempfile.mkdtemp(prefix="rram-nbdtls-")
    try:
        sock = server.listen_unix(os.path.join(tmp, "nbd.sock"))
        host, port = server.listen_tcp("127.0.0.1", 0)
        server.start()
        yield server, sock, (host, port)
    finally:
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)


def nbds(addr, cert_dir: str) -> str:
    return f"nbds://{addr[0]}:{addr[1]}/?tls-certificates={cert_dir}"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    path = tmp_path_factory.mktemp("img") / "image.raw"
    path.write_bytes(raw)
    return path, hashlib.sha256(raw).hexdigest()


# -- real clients ------------------------------------------------------------------------------------


def test_tls_clients_read_back_what_they_wrote_and_plaintext_is_refused(memory_server, certs, image, tmp_path):
    need("nbdcopy")
    server, sock, addr = memory_server
    src, digest = image
    run("nbdcopy", "--connections=2", str(src), nbds(addr, certs["client"]))
    out = tmp_path / "out.raw"
    run("nbdcopy", f"nbds+unix:///?socket={sock}&tls-certificates={certs['client']}", str(out))
    assert sha256_file(out) == digest
    assert server.counters["tls_connections"] >= 3 and server.counters["c_requests"] == 0
    # plaintext: every option but STARTTLS is refused, so no plaintext client reaches the data
    refused = run("nbdinfo", f"nbd://{addr[0]}:{addr[1]}/", check=False)
    assert refused.returncode != 0
    # no client certificate, or one from another CA: the TLS handshake fails
    for who in ("anonymous", "stranger"):
        assert run("nbdinfo", nbds(addr, certs[who]), check=False).returncode != 0, who
    deadline = time.monotonic() + 10  # the server counts a failed handshake after the client has gone
    while server.counters["tls_failures"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.counters["tls_failures"] >= 2
    assert "export-size: 33554432" in run("nbdinfo", nbds(addr, certs["client"])).stdout  # still serving


def test_qemu_over_tls(memory_server, certs):
    need("qemu-io")
    _, _, (host, port) = memory_server
    creds = f"tls-creds-x509,id=tls0,dir={certs['client']},endpoint=client"
    opts = f"driver=nbd,host={host},port={port},tls-creds=tls0"
    proc = run("qemu-io", "--object", creds, "--image-opts", opts,
               "-c", "write -P 0x5a 1M 2M", "-c", "read -P 0x5a 1M 2M", "-c", "read -P 0 0 1M")
    assert "Pattern verification failed" not in proc.stdout + proc.stderr
    info = run("qemu-img", "info", "--object", creds, "--image-opts", opts).stdout
    assert "virtual size: 32 MiB" in info


# -- hand-driven clients -----------------------------------------------------------------------------


def _option(sock, option: int, data: bytes = b"") -> tuple[int, bytes]:
    sock.sendall(P.OPTION.pack(P.IHAVEOPT, option, len(data)) + data)
    head = _exactly(sock, P.OPTION_REPLY.size)
    magic, opt, reply, length = P.OPTION_REPLY.unpack(head)
    assert magic == P.NBD_REP_MAGIC and opt == option
    return reply, _exactly(sock, length)


def _exactly(sock, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"server closed after {len(out)} of {n} bytes"
        out += chunk
    return out


def _greeted(addr) -> socket.socket:
    sock = socket.create_connection(addr, timeout=5)
    assert len(_exactly(sock, P.GREETING.size)) == P.GREETING.size
    sock.sendall(P.CLIENT_FLAGS.pack(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES))
    return sock


def _closed(sock) -> bool:
    try:
        return sock.recv(1 << 16) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


def test_options_before_starttls_and_bad_tls_peers_are_refused(memory_server, certs):
    server, _, addr = memory_server
    go = struct.pack(">IH", 0, 0)
    client_ctx = ssl.create_default_context(cafile=os.path.join(certs["client"], "ca-cert.pem"))
    client_ctx.load_cert_chain(os.path.join(certs["client"], "client-cert.pem"),
                               os.path.join(certs["client"], "client-key.pem"))
    opened = []
    try:
        # NBD_OPT_GO / LIST / STRUCTURED_REPLY before STARTTLS: NBD_REP_ERR_TLS_REQD, nothing served
        s = _greeted(addr)
        opened.append(s)
        for option, data in ((P.NBD_OPT_GO, go), (P.NBD_OPT_LIST, b""), (P.NBD_OPT_STRUCTURED_REPLY, b"")):
            assert _option(s, option, data)[0] == P.NBD_REP_ERR_TLS_REQD
        # NBD_OPT_EXPORT_NAME has no error reply: the server hangs up
        s.sendall(P.OPTION.pack(P.IHAVEOPT, P.NBD_OPT_EXPORT_NAME, 0))
        assert _closed(s)
        # plaintext sent right behind STARTTLS (before its reply) would escape TLS: dropped
        s = _greeted(addr)
        opened.append(s)
        s.sendall(P.OPTION.pack(P.IHAVEOPT, P.NBD_OPT_STARTTLS, 0) + P.OPTION.pack(P.IHAVEOPT, P.NBD_OPT_GO, len(go))
                  + go)
        assert _closed(s)
        # STARTTLS acknowledged, then garbage instead of a TLS handshake
        s = _greeted(addr)
        opened.append(s)
        assert _option(s, P.NBD_OPT_STARTTLS)[0] == P.NBD_REP_ACK
        s.sendall(os.urandom(4096))
        assert _closed(s)
        # a proper TLS session, then garbage inside it
        s = _greeted(addr)
        assert _option(s, P.NBD_OPT_STARTTLS)[0] == P.NBD_REP_ACK
        t = client_ctx.wrap_socket(s, server_hostname="127.0.0.1")
        opened.append(t)
        assert _option(t, P.NBD_OPT_STARTTLS)[0] == P.NBD_REP_ERR_INVALID  # TLS twice is a client error
        t.sendall(os.urandom(64))
        assert _closed(t)
    finally:
        for s in opened:
            s.close()
    assert server.counters["disconnected_bad_clients"] >= 3
    assert server.active_connections <= 1
    assert "export-size: 33554432" in run("nbdinfo", nbds(addr, certs["client"])).stdout


# -- rram requester ----------------------------------------------------------------------------------


def _requester(cluster, *args: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
    log_path = os.path.join(cluster.workdir, "requester.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rram.frontends.requester", "--config", cluster.config_path,
                                 "--name", "req", "--export-size", str(SIZE), "--no-mlock", *args],
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=env)
    return proc, log_path


def test_requester_refuses_a_network_listen_without_tls(cluster):
    rc = subprocess.run([sys.executable, "-m", "rram.frontends.requester", "--config", cluster.config_path,
                         "--listen", "0.0.0.0:0", "--no-mlock"], capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, PYTHONPATH=_ROOT))
    assert rc.returncode == 2
    assert "--listen 0.0.0.0 is reachable from other hosts" in rc.stderr and "--nbd-tls" in rc.stderr


def test_requester_serves_tls_to_nbdcopy_from_the_providers(cluster, certs, image, tmp_path):
    need("nbdcopy")
    src, digest = image
    proc, log_path = _requester(cluster, "--listen", "127.0.0.1:0", "--nbd-tls", certs["server"])
    try:
        line = _ready_line(proc, log_path)
        assert "tls=required" in line
        host, port = next(w for w in line.split() if w.startswith("listen=")).split("=", 1)[1].rsplit(":", 1)
        uri = nbds((host, port), certs["client"])
        run("nbdcopy", str(src), uri)
        out = tmp_path / "out.raw"
        run("nbdcopy", uri, str(out))
        assert sha256_file(out) == digest
        assert run("nbdinfo", f"nbd://{host}:{port}/", check=False).returncode != 0
        used = sum(s["used"] for s in cluster.provider_stats().values())
        assert used >= 8 * MiB  # the local budget is 2 MiB: most of the image is in the providers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, _tail(log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_nbd_client_negotiates_tls(memory_server, certs):
    """Debian's nbd-client (GnuTLS, TLS 1.2) on the host: option haggling only (``-l``), since
    the host has no kernel NBD device; tests/vm/test_nbd_tls.py attaches it in the VM."""
    need("nbd-client")
    server, _, (host, port) = memory_server
    c = certs["client"]
    before = server.counters["tls_connections"]
    listed = run("nbd-client", "-l", host, str(port), "-certfile", f"{c}/client-cert.pem", "-keyfile",
                 f"{c}/client-key.pem", "-cacertfile", f"{c}/ca-cert.pem", "-tlshostname", "127.0.0.1")
    assert "Negotiation" in listed.stdout and server.counters["tls_connections"] == before + 1
    plain = run("nbd-client", "-l", host, str(port), check=False)
    assert "requires TLS" in plain.stdout + plain.stderr
