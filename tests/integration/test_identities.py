"""Identities and roles against real provider processes: names are proven, roles are enforced,
keys are revoked without a restart, quotas hold, and the `rram keys` / `undrain` commands work."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

from rram import config as C
from rram import errors, transport
from rram.control import auth, keys
from rram.control import messages as M
from rram.control.client import ProviderClient
from rram.testing.cluster import _ROOT
from rram.transport import tcp

from .conftest import tcp_cluster

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture
def cluster(tmp_path):
    with tcp_cluster(n_providers=1, capacity="16MiB", workdir=str(tmp_path), slab_size="1MiB", replicas=1,
                     lease_grace=1.0, io_timeout=2.0) as c:
        yield c


def rram_cli(*args):
    env = dict(os.environ, PYTHONPATH=_ROOT)
    return subprocess.run([sys.executable, "-m", "rram", *args], capture_output=True, text=True, timeout=60, env=env)


def test_a_requester_key_cannot_drain_shutdown_reload_or_list_others(cluster):
    alice, bob = cluster.client("p0", "alice"), cluster.client("p0", "bob")
    bob.alloc_slab(MiB)
    for call in (alice.drain, alice.undrain, alice.shutdown, alice.reload):
        with pytest.raises(errors.AuthError, match="requester alice may not"):
            call()
    mine = alice.stats()
    assert {s["requester"] for s in mine["per_session"]} == {"alice"}  # bob is not listed
    assert mine["sessions"] == 1
    alice.alloc_slab(MiB)  # refused requests leave the connection usable
    admin = cluster.client("p0", "admin", "operator")
    assert {s["requester"] for s in admin.stats()["per_session"]} == {"alice", "bob", "admin"}
    with pytest.raises(errors.AuthError, match="operator admin may not alloc_slab"):
        admin.alloc_slab(MiB)
    for c in (alice, bob, admin):
        c.close()


def test_names_and_roles_are_proven_not_asserted(cluster):
    alice = cluster.credential("alice")
    # alice's key presented under another name, or as an operator, does not verify
    for forged in (auth.Credential("bob", "requester", 1, alice.key),
                   auth.Credential("alice", "operator", 1, alice.key),
                   auth.Credential("alice", "requester", 2, alice.key)):
        c = ProviderClient(cluster.config.node("p0"), forged, tls=cluster.tls)
        with pytest.raises(errors.AuthError, match="wrong key"):
            c.connect()
    with cluster.client("p0", "admin", "operator") as admin:
        assert admin.stats()["counters"]["auth_failures"] == 3


def test_a_requester_cannot_reach_another_requesters_slab(cluster):
    rt = transport.requester_transport("tcp")
    alice, bob = cluster.client("p0", "alice"), cluster.client("p0", "bob")
    secret_page = np.frombuffer(os.urandom(4096), np.uint8).copy()
    lease = alice.alloc_slab(MiB)
    ep_a, ep_b = rt.endpoint(), rt.endpoint()
    ep_a.connect(alice.connect_data(ep_a.local_params()))
    ep_b.connect(bob.connect_data(ep_b.local_params()))
    buf = np.zeros(4096, np.uint8)
    for ep, data, opcode in ((ep_a, secret_page, transport.OP_WRITE), (ep_b, buf, transport.OP_READ)):
        lkey = ep.register_local(data.ctypes.data, data.nbytes)
        ops = transport.new_ops(1)
        # bob uses alice's exact address and rkey (sniffed, or guessed) on his own connection
        ops[0] = (data.ctypes.data, lease.region.addr, 4096, lkey, lease.region.rkey, opcode, 0)
        ep.post(ops, 1)
        comp = transport.new_completions(1)
        assert ep.poll(comp, 5.0) == 1
        if ep is ep_a:
            assert comp[0]["status"] == 0
        else:
            assert comp[0]["status"] == 10  # IBV_WC_REM_ACCESS_ERR: the rkey means nothing in bob's session
    assert not buf.any()
    for x in (ep_a, ep_b, alice, bob):
        x.close()


def test_revoking_a_key_cuts_its_sessions_without_a_restart(cluster):
    alice = cluster.client("p0", "alice")
    alice.alloc_slab(MiB)
    bob = cluster.client("p0", "bob")
    cluster.config.revoked = {"alice": 1}
    cluster.save_config()
    rc = rram_cli("reload", "--config", cluster.config_path)
    assert rc.returncode == 0 and "p0: 1 sessions cut" in rc.stdout, rc.stderr
    with pytest.raises(errors.RramError):
        alice.heartbeat()  # her connection was cut and her leases freed
    with pytest.raises(errors.AuthError, match="generation 1\\) is revoked"):
        ProviderClient(cluster.config.node("p0"), auth.derive(cluster.config.secret_bytes(), "alice", "requester", 1),
                       tls=cluster.tls).connect()
    assert bob.heartbeat()["state"] == "serving"  # others go on
    with cluster.client("p0", "admin", "operator") as admin:
        assert admin.stats()["used"] == 0
    again = cluster.client("p0", "alice")  # the next generation (what `rram keys add` issues) works
    assert again.credential.generation == 2
    for c in (alice, bob, again):
        c.close()


def test_quotas_per_requester(cluster):
    cluster.config.quotas, cluster.config.default_quota = {"alice": 2 * MiB}, 4 * MiB
    cluster.save_config()
    with cluster.client("p0", "admin", "operator") as admin:
        assert admin.reload() == 0
    alice, bob = cluster.client("p0", "alice"), cluster.client("p0", "bob")
    alice.alloc_slab(MiB)
    alice.alloc_slab(MiB)
    with pytest.raises(errors.CapacityError, match="over its quota of 2097152"):
        alice.alloc_slab(MiB)
    for _ in range(4):
        bob.alloc_slab(MiB)
    with pytest.raises(errors.CapacityError, match="quota"):
        bob.alloc_slab(MiB)
    alice.close()
    bob.close()


def test_a_quota_holds_against_racing_allocs_from_many_sessions(cluster):
    """The quota is reserved, not only checked: 8 sessions of one requester ask at once."""
    cluster.config.quotas = {"carol": 4 * MiB}
    cluster.save_config()
    with cluster.client("p0", "admin", "operator") as admin:
        assert admin.reload() == 0
    clients = [cluster.client("p0", "carol") for _ in range(8)]
    start = threading.Barrier(len(clients))
    granted, refused = [], []

    def ask(c):
        start.wait()
        for _ in range(2):
            try:
                granted.append(c.alloc_slab(MiB))
            except errors.CapacityError:
                refused.append(c)

    threads = [threading.Thread(target=ask, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(granted) == 4 and len(refused) == 12, (len(granted), len(refused))
    with cluster.client("p0", "admin", "operator") as admin:
        assert admin.stats()["used"] == 4 * MiB
    for c in clients:
        c.close()


def test_undrain_command(cluster):
    with cluster.client("p0", "admin", "operator") as admin:
        admin.drain()
    c = cluster.client("p0", "alice")
    with pytest.raises(errors.CapacityError, match="draining"):
        c.alloc_slab(MiB)
    rc = rram_cli("undrain", "--config", cluster.config_path, "p0")
    assert rc.returncode == 0 and "p0: serving" in rc.stdout, rc.stderr
    c.alloc_slab(MiB)
    c.close()


def test_keys_command_issues_a_key_file_that_works_alone(cluster, tmp_path):
    rc = rram_cli("keys", "add", "carol", "--role", "requester", "--config", cluster.config_path)
    assert rc.returncode == 0, rc.stderr
    path = cluster.config.key_path("carol")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cred = keys.load(path)
    assert (cred.name, cred.role, cred.generation) == ("carol", "requester", 1)
    with ProviderClient(cluster.config.node("p0"), cred, tls=cluster.tls) as c:
        c.connect()
        c.alloc_slab(MiB)
    again = rram_cli("keys", "add", "carol", "--role", "requester", "--config", cluster.config_path)
    assert again.returncode == 1 and "already exists" in again.stderr
    # init refuses an inline master key; with secret_file it writes one, 0600
    cfg_path = tmp_path / "new.yaml"
    cfg_path.write_text("secret_file: master.key\nnodes: []\n")
    rc = rram_cli("keys", "init", "--config", str(cfg_path))
    assert rc.returncode == 0, rc.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "master.key").st_mode) == 0o600
    assert len(C.load(cfg_path).secret_bytes()) == 64  # 32 bytes, hex


def test_bad_key_files_are_named_in_the_error(tmp_path):
    p = tmp_path / "x.key"
    p.write_text("name: x\nrole: boss\ngeneration: 1\nkey: '00'\n")
    with pytest.raises(errors.ConfigError, match=r"x.key: role must be one of requester, operator, provider"):
        keys.load(p)
    p.write_text("name: x\nrole: operator\ngeneration: 1\nkey: zz\n")
    with pytest.raises(errors.ConfigError, match=r"x.key: key: expected 32 bytes in hex"):
        keys.load(p)


def test_hello_with_a_bad_role_is_a_protocol_error(cluster):
    import socket

    node = cluster.config.node("p0")
    with cluster.tls.wrap_socket(socket.create_connection((node.address, node.port), timeout=5),
                                 server_hostname=node.name) as s:
        s.sendall(M.encode(M.request("hello", 1, requester="x", role="root", generation=1, nonce=auth.new_nonce())))
        rep = M.Decoder("reply").feed(s.recv(4096))[0]
    assert rep["error"]["code"] == "bad_request" and "role must be one of" in rep["error"]["message"]


def test_a_sniffed_data_token_is_refused_by_a_real_provider(cluster):
    import socket

    rt = transport.requester_transport("tcp")
    alice = cluster.client("p0", "alice")
    lease = alice.alloc_slab(MiB)
    ep = rt.endpoint()
    params = alice.connect_data(ep.local_params())
    ep.connect(params)
    # an eavesdropper saw the connect reply (token, host, port) but not the session secret,
    # which never crosses the wire; bob's own session secret does not prove alice's token either
    bob = cluster.client("p0", "bob")
    for secret in (bytes(32), bytes.fromhex(bob.connect_data({})["session_secret"])):
        with socket.create_connection((params["host"], params["port"]), timeout=5) as s:
            with pytest.raises(errors.ConnectionLost, match="not proven with its secret"):
                tcp.handshake(s, bytes.fromhex(params["token"]), secret)
    buf = np.frombuffer(os.urandom(4096), np.uint8).copy()
    lkey = ep.register_local(buf.ctypes.data, buf.nbytes)
    ops = transport.new_ops(1)
    ops[0] = (buf.ctypes.data, lease.region.addr, 4096, lkey, lease.region.rkey, transport.OP_WRITE, 0)
    ep.post(ops, 1)  # alice's connection was not replaced
    comp = transport.new_completions(1)
    assert ep.poll(comp, 5.0) == 1 and comp[0]["status"] == 0
    for x in (ep, alice, bob):
        x.close()


def test_sessions_per_requester_are_capped(cluster):
    cap = cluster.config.limits.max_sessions_per_requester
    held = [cluster.client("p0", "alice") for _ in range(cap)]
    with pytest.raises(errors.RramError, match="already has 8 sessions here"):
        cluster.client("p0", "alice")
    other = cluster.client("p0", "bob")  # a cap per requester, not per provider
    held[0].close()  # bye ends a session at once: room again
    again = cluster.client("p0", "alice")
    for c in held[1:] + [other, again]:
        c.close()
