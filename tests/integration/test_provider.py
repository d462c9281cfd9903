"""The provider daemon as a real process: auth, bad peers, capacity, leases, grace, resume, CLI."""
from __future__ import annotations

import json
import signal
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest

from rram import errors, transport
from rram.control import auth
from rram.control import messages as M
from rram.control.client import ProviderClient
from rram.testing.cluster import _ROOT

from .conftest import IO_TIMEOUT, LEASE_GRACE

pytestmark = pytest.mark.integration

MiB = 1 << 20


def client(cluster, name="p0", requester="test", role="requester", credential=None) -> ProviderClient:
    c = ProviderClient(cluster.config.node(name), credential or cluster.credential(requester, role), tls=cluster.tls)
    c.connect()
    return c


def stats(cluster, name="p0") -> dict:
    with client(cluster, name, "observer", "operator") as c:
        return c.stats()


class RawPeer:
    """A hand-driven control connection, for sending what a well-behaved client never would."""

    opened: list[RawPeer] = []

    def __init__(self, cluster, name="p0"):
        RawPeer.opened.append(self)
        node = cluster.config.node(name)
        self.cluster = cluster
        sock = socket.create_connection((node.address, node.port), timeout=5)
        # over the cluster's TLS, as every client: what is hand-driven is what runs inside it
        self.sock = cluster.tls.wrap_socket(sock, server_hostname=name) if cluster.tls else sock
        self.dec = M.Decoder("reply")

    def send(self, data: bytes):
        self.sock.sendall(data)

    def recv(self) -> dict:
        while True:
            data = self.sock.recv(65536)
            assert data, "provider closed without a reply"
            msgs = self.dec.feed(data)
            if msgs:
                return msgs[0]

    def closed(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True

    def login(self, requester="raw", role="requester"):
        nonce, cred = auth.new_nonce(), self.cluster.credential(requester, role)
        self.send(M.encode(M.request("hello", 1, requester=requester, role=role, generation=1, nonce=nonce)))
        challenge = self.recv()["challenge"]
        self.send(M.encode(M.request("auth", 2, mac=auth.requester_mac(cred.key, challenge, nonce, requester))))
        welcome = self.recv()
        assert welcome["ok"], welcome
        return welcome

    def close(self):
        self.sock.close()


@pytest.fixture(autouse=True)
def _close_raw_peers():
    yield
    while RawPeer.opened:
        RawPeer.opened.pop().close()


def test_wrong_secret_is_refused_and_the_provider_keeps_serving(cluster):
    good = client(cluster)
    with pytest.raises(errors.AuthError, match="wrong key"):
        client(cluster, credential=auth.derive(b"not-the-master-key", "test", "requester"))
    lease = good.alloc_slab(MiB)  # the authenticated client is unaffected
    assert lease.region.length == MiB
    s = stats(cluster)
    assert s["counters"]["auth_failures"] == 1 and s["leases"] == 1
    good.close()


def test_provider_must_prove_the_secret_too(cluster):
    peer = RawPeer(cluster)
    welcome = peer.login()
    assert welcome["node"] == "p0" and welcome["transport"] == "tcp" and welcome["capacity"] == 8 * MiB
    peer.close()
    # a client whose secret differs is refused before the provider proves anything to it
    c = ProviderClient(cluster.config.node("p0"), auth.derive(b"x", "r", "requester"), tls=cluster.tls)
    with pytest.raises(errors.AuthError):
        c.connect()


@pytest.mark.parametrize("data,match", [
    (struct.pack(">I", 0x7FFFFFFF), "exceeds the 4096-byte limit"),
    (struct.pack(">I", M.MAX_HANDSHAKE_FRAME + 1), "exceeds the 4096-byte limit"),  # before auth: a few KiB
    (struct.pack(">I", 9) + b"{not json", "not valid JSON"),
    (M.encode({"v": 9, "type": "hello", "id": 1}), "unsupported protocol version 9"),
    (M.encode({"v": 1, "type": "reboot", "id": 1}), "unknown request type 'reboot'"),
    (M.encode({"v": 1, "type": "hello", "id": 1, "requester": 5, "role": "requester", "generation": 1,
               "nonce": "00"}), "'requester' must be string"),
    (M.encode({"v": 1, "type": "stats", "id": 1}), "expected hello first"),
])
def test_bad_frames_before_auth(cluster, data, match):
    peer = RawPeer(cluster)
    peer.send(data)
    rep = peer.recv()
    assert rep["ok"] is False and rep["error"]["code"] == "bad_request"
    assert match in rep["error"]["message"]
    assert peer.closed()
    assert stats(cluster)["counters"]["protocol_errors"] == 1


def test_bad_frames_after_auth_and_bad_fields(cluster):
    peer = RawPeer(cluster)
    peer.login()
    # semantic errors are answered and the connection stays
    peer.send(M.encode(M.request("alloc_slab", 3, size=1000)))
    rep = peer.recv()
    assert rep["error"]["code"] == "bad_request" and "multiple of 4096" in rep["error"]["message"]
    peer.send(M.encode(M.request("free_slab", 4, lease=999)))
    assert peer.recv()["error"]["code"] == "not_found"
    peer.send(M.encode(M.request("hello", 5, requester="x", role="requester", generation=1, nonce=auth.new_nonce())))
    assert peer.recv()["error"]["code"] == "state"
    peer.send(M.encode(M.request("heartbeat", 6)))
    assert peer.recv()["state"] == "serving"
    # a broken frame ends the connection, with the reason
    peer.send(M.LENGTH.pack(10) + b'{"v":1,"ty')
    peer.send(M.LENGTH.pack(2) + b"[]")
    rep = peer.recv()
    assert rep["error"]["code"] == "bad_request" and "not valid JSON" in rep["error"]["message"]
    assert peer.closed()
    assert stats(cluster)["sessions"] == 2  # the raw peer's session waits out its grace; observer


def test_truncated_and_stalled_peers_are_dropped(cluster):
    truncated = RawPeer(cluster)
    truncated.send(M.encode(M.request("stats", 1))[:7])
    truncated.close()
    silent = RawPeer(cluster)  # never says hello
    stalled = RawPeer(cluster)
    stalled.login()
    stalled.send(M.encode(M.request("stats", 3))[:5])  # half a frame, then nothing
    t0 = time.monotonic()
    rep = silent.recv()
    assert "timed out" in rep["error"]["message"] and "handshake" in rep["error"]["message"]
    rep = stalled.recv()
    assert "timed out" in rep["error"]["message"] and "frame" in rep["error"]["message"]
    assert time.monotonic() - t0 < IO_TIMEOUT + 3
    assert silent.closed() and stalled.closed()
    assert stats(cluster)["counters"]["protocol_errors"] == 3


def test_capacity_is_never_exceeded_and_freed_space_is_reused(cluster):
    a, b = client(cluster, requester="a"), client(cluster, requester="b")
    leases = [a.alloc_slab(2 * MiB) for _ in range(3)]
    with pytest.raises(errors.CapacityError, match="capacity"):
        b.alloc_slab(4 * MiB)
    last = b.alloc_slab(2 * MiB)
    with pytest.raises(errors.CapacityError):
        a.alloc_slab(4096)
    s = stats(cluster)
    assert (s["used"], s["free"], s["leases"]) == (8 * MiB, 0, 4)
    assert len({lease.region.rkey for lease in leases + [last]}) == 4
    with pytest.raises(errors.NotFound):
        b.free_slab(leases[0])  # a lease belongs to its session
    a.free_slab(leases[0])
    with pytest.raises(errors.NotFound):
        a.free_slab(leases[0])
    again = b.alloc_slab(2 * MiB)
    assert again.lease_id not in {lease.lease_id for lease in leases}
    s = stats(cluster)
    assert s["used"] == 8 * MiB and s["counters"]["allocs"] == 5 and s["counters"]["frees"] == 1
    per = {p["requester"]: p for p in s["per_session"]}
    assert per["a"]["bytes"] == 4 * MiB and per["b"]["bytes"] == 4 * MiB and per["b"]["leases"] == 2
    a.close()
    b.close()
    assert stats(cluster)["used"] == 0  # bye releases everything


def _write_read(ep, region, payload: np.ndarray) -> np.ndarray:
    buf = payload.copy()
    back = np.zeros_like(buf)
    lk1 = ep.register_local(buf.ctypes.data, buf.nbytes)
    lk2 = ep.register_local(back.ctypes.data, back.nbytes)
    ops = transport.new_ops(2)
    ops[0] = (buf.ctypes.data, region.addr, buf.nbytes, lk1, region.rkey, transport.OP_WRITE, 0)
    ops[1] = (back.ctypes.data, region.addr, buf.nbytes, lk2, region.rkey, transport.OP_READ, 0)
    ep.execute(ops, 1)
    return back


def _read(ep, region, n: int) -> np.ndarray:
    back = np.zeros(n, np.uint8)
    lk = ep.register_local(back.ctypes.data, n)
    ops = transport.new_ops(1)
    ops[0] = (back.ctypes.data, region.addr, n, lk, region.rkey, transport.OP_READ, 0)
    ep.execute(ops, 2)
    return back


def test_data_path_and_stats_counters(cluster):
    c = client(cluster)
    lease = c.alloc_slab(MiB)
    with transport.requester_transport("tcp") as rt, rt.endpoint() as ep:
        ep.connect(c.connect_data(ep.local_params()))
        payload = np.random.default_rng(1).integers(0, 256, 65536, dtype=np.uint8)
        back = _write_read(ep, lease.region, payload)
        assert zlib.crc32(back) == zlib.crc32(payload)
    s = c.stats()
    assert s["bytes_written"] == 65536 and s["bytes_read"] == 65536 and s["ops"] == 2 and s["batches"] == 1
    assert s["incarnation"] == c.incarnation and s["transport"] == "tcp" and s["uptime"] > 0
    hb = c.heartbeat()
    assert hb["capacity"] == 8 * MiB and hb["free"] == 7 * MiB and hb["state"] == "serving"
    c.close()
    c.close()  # idempotent


REQUESTER = textwrap.dedent("""
    import sys, time
    from rram import config, tls
    from rram.control import keys
    from rram.control.client import ProviderClient
    cfg = config.load(sys.argv[1])
    c = ProviderClient(cfg.node("p0"), keys.credential(cfg, "doomed", "requester"), tls=tls.cluster_client_context(cfg))
    c.connect()
    for _ in range(3):
        c.alloc_slab(1 << 20)
    print("leased", flush=True)
    time.sleep(60)
""")


def test_killed_requester_leases_are_reclaimed_after_grace(cluster):
    proc = subprocess.Popen([sys.executable, "-c", REQUESTER, cluster.config_path], stdout=subprocess.PIPE,
                            text=True, cwd=_ROOT)
    try:
        assert proc.stdout.readline().strip() == "leased"
        proc.kill()
    finally:
        proc.wait()
        proc.stdout.close()
    other = client(cluster, requester="survivor")
    other.alloc_slab(MiB)  # the provider keeps serving others
    assert {p["requester"] for p in other.stats()["per_session"]} == {"survivor"}  # no one else's
    s = stats(cluster)  # an operator sees every session
    doomed = [p for p in s["per_session"] if p["requester"] == "doomed"]
    assert s["used"] == 4 * MiB and doomed and doomed[0]["leases"] == 3
    deadline = time.monotonic() + LEASE_GRACE + 3
    while time.monotonic() < deadline and other.stats()["used"] != MiB:
        time.sleep(0.1)
    s = stats(cluster)
    assert s["used"] == MiB and s["leases"] == 1 and s["counters"]["sessions_expired"] >= 1
    assert not [p for p in s["per_session"] if p["requester"] == "doomed"]
    other.close()


def test_resume_inside_grace_keeps_leases_and_data(cluster):
    c = client(cluster, requester="phoenix")
    leases = [c.alloc_slab(MiB) for _ in range(2)]
    payload = np.arange(8192, dtype=np.uint32).view(np.uint8)
    with transport.requester_transport("tcp") as rt, rt.endpoint() as ep:
        ep.connect(c.connect_data(ep.local_params()))
        ep.reconnect_params = c.connect_data
        _write_read(ep, leases[1].region, payload)
        session = c.session
        c._hangup()  # the control connection breaks, as with a network blip
        with pytest.raises(errors.ConnectionLost):
            c.stats()
        time.sleep(LEASE_GRACE / 3)
        back = c.resume()
        assert back == leases and c.session == session
        ep.recover()
        assert zlib.crc32(_read(ep, leases[1].region, payload.nbytes)) == zlib.crc32(payload)
    s = c.stats()
    assert s["leases"] == 2 and s["counters"]["sessions_resumed"] == 1
    c.close()


def test_resume_after_grace_fails_cleanly(cluster):
    c = client(cluster, requester="late")
    c.alloc_slab(MiB)
    c._hangup()
    time.sleep(LEASE_GRACE + 1)
    with pytest.raises(errors.NotFound, match="lease_grace"):
        c.resume()
    assert stats(cluster)["used"] == 0
    c.close()


def test_sigterm_is_an_orderly_shutdown(cluster):
    c = client(cluster)
    c.alloc_slab(MiB)
    assert cluster.kill("p1", signal.SIGTERM) == 0
    assert "stopped" in cluster.log_tail("p1")
    assert cluster.kill("p0", signal.SIGTERM) == 0
    with pytest.raises(errors.ConnectionLost):
        c.stats()
    cluster.restart("p0")
    c2 = client(cluster)
    assert c2.incarnation != c.incarnation and c2.stats()["used"] == 0
    c2.close()
    c.close()


def run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "rram", *args], capture_output=True, text=True, cwd=_ROOT,
                          timeout=timeout)


def test_status_cli(cluster):
    c = client(cluster, "p1", requester="busy")
    c.alloc_slab(2 * MiB)
    out = run_cli("status", "--config", cluster.config_path, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"p0", "p1"} and data["p1"]["used"] == 2 * MiB and data["p0"]["used"] == 0
    assert data["p1"]["incarnation"] > 0 and "epoch" not in data["p1"]  # a restart marker, not an epoch
    out = run_cli("status", "--config", cluster.config_path)
    assert out.returncode == 0 and "p0" in out.stdout and "p1" in out.stdout and "8MiB" in out.stdout
    cluster.kill("p0")
    out = run_cli("status", "--config", cluster.config_path)
    assert out.returncode == 1 and "unreachable" in out.stdout and "cannot reach provider p0" in out.stdout
    c.close()


def test_cli_errors_are_clear(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("nodes: [{name: a, address: 127.0.0.1, port: 1, capacity: lots}]\n")
    out = run_cli("provider", "--config", str(bad), "--name", "a")
    assert out.returncode == 1 and "nodes[0].capacity" in out.stderr
    out = run_cli("status", "--config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 1 and "cannot read" in out.stderr


def test_cli_reports_a_missing_subcommand_module(capsys):
    from rram import cli

    args = cli.build_parser().parse_args(["drain", "--config", "x.yaml", "n1"])
    assert cli._lazy("rram.control.no_such_module")(args) == cli.MISSING_MODULE_EXIT
    assert "not available in this build (rram.control.no_such_module is missing)" in capsys.readouterr().err
