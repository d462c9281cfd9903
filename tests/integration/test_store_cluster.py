"""The page store against real provider processes: volume, reuse, and a hostile data client."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from rram import PAGE_SIZE
from rram.control.client import ProviderClient
from rram.cluster import open_store
from rram.testing.pages import make_pages, page_checksums
from rram.transport import tcp, wire

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "plain"])
def test_100k_random_pages_verified_invalidated_and_space_reused(cluster, seal):
    # the `cluster` fixture: 2 tcp providers of 8 MiB; make a bigger one here
    from rram.testing.cluster import LocalCluster

    cluster.stop()
    with LocalCluster(n_providers=3, capacity="192MiB", slab_size="8MiB") as big:
        rng = np.random.default_rng(21)
        n = 100_000
        idx = np.unique(rng.integers(0, 1 << 32, n + 1000, dtype=np.uint64))[:n]
        rng.shuffle(idx)
        data = make_pages(n, seed=21)
        sums = page_checksums(data, n)
        with open_store(big.config, name="req", local_budget=8 << 20, seal=seal) as store:
            pool = store.create_pool()
            for s in range(0, n, 10_000):
                store.put_many(pool, 5, idx[s : s + 10_000], data[s * PAGE_SIZE : (s + 10_000) * PAGE_SIZE])
            out = np.zeros_like(data)
            assert store.get_many(pool, 5, idx, out).all()
            assert np.array_equal(page_checksums(out, n), sums)
            s = store.stats()
            assert s["remote_pages"] > n // 2 and s["failed_puts"] == 0
            assert s["sealed"] == seal and s.get("seal_failures", 0) == 0
            leased = s["remote_leased_bytes"]
            # invalidate half at random, write as many new pages: the leased footprint stays put
            drop = rng.permutation(n)[: n // 2]
            assert store.invalidate_pages(pool, 5, idx[drop]) == n // 2
            fresh_idx = idx[drop] ^ np.uint64(1 << 31)  # other keys
            fresh = make_pages(n // 2, seed=22)
            store.put_many(pool, 5, fresh_idx, fresh)
            assert store.stats()["remote_leased_bytes"] <= leased * 1.1
            got = np.zeros_like(fresh)
            assert store.get_many(pool, 5, fresh_idx, got).all()
            assert np.array_equal(page_checksums(got, n // 2), page_checksums(fresh, n // 2))
            missing = np.zeros(PAGE_SIZE * 10, dtype=np.uint8)
            assert not store.get_many(pool, 5, idx[drop[:10]], missing).any()
            for name in big.providers:
                with ProviderClient(big.config.node(name), big.credential("check"), tls=big.tls) as c:
                    c.connect()
                    st = c.stats()
                    assert st["used"] <= st["capacity"]


def _events(sock):
    """Frames the provider sends until it closes the connection (or 3 s of silence)."""
    dec = wire.Decoder(wire.TO_REQUESTER)
    out = []
    sock.settimeout(3)
    try:
        while True:
            ev = dec.next_event()
            if ev is not None:
                out.append(ev)
                continue
            n = sock.recv_into(dec.writable())
            if n == 0:
                return out, True
            dec.wrote(n)
    except (socket.timeout, ConnectionResetError):
        return out, False


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\n\r\n" + b"x" * 64,                                       # not our protocol
    wire.header(wire.REQUEST, batch_id=1, count=1)[:10],                        # truncated header
    b"RRMD" + bytes([99]) + wire.header(wire.REQUEST, batch_id=1, count=0)[5:],  # wrong version
    wire.header(wire.REQUEST, batch_id=1, count=1 << 30),                       # absurd op count
    wire.header(wire.REQUEST, batch_id=1, count=1, payload_len=(1 << 31) - 1),  # absurd payload
])
def test_bad_data_frames_to_a_real_provider_get_an_error_and_others_go_on(cluster, garbage):
    cfg = cluster.config
    with open_store(cfg, name="good", local_budget=1 << 20) as store:
        pool = store.create_pool()
        data = make_pages(2000, seed=3)
        store.put_many(pool, 0, np.arange(2000), data)
        with ProviderClient(cfg.node("p0"), cluster.credential("hostile"), tls=cluster.tls) as bad:
            bad.connect()
            params = bad.connect_data({})
            sock = socket.create_connection((params["host"], params["port"]), timeout=5)
            tcp.handshake(sock, bytes.fromhex(params["token"]), bytes.fromhex(params["session_secret"]))
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            events, closed = _events(sock)
            sock.close()
            assert closed, "a broken stream is closed by the provider"
            errs = [e for e in events if isinstance(e, wire.Error)]
            assert errs, f"no error frame before the close: {events}"
        out = np.zeros_like(data)
        assert store.get_many(pool, 0, np.arange(2000), out).all()
        assert np.array_equal(out, data)
        assert cluster.alive("p0")


def test_bad_key_and_out_of_bounds_from_a_real_provider(cluster):
    cfg = cluster.config
    with ProviderClient(cfg.node("p0"), cluster.credential("prober"), tls=cluster.tls) as c:
        c.connect()
        lease = c.alloc_slab(1 << 20)
        params = c.connect_data({})
        sock = socket.create_connection((params["host"], params["port"]), timeout=5)
        key = tcp.handshake(sock, bytes.fromhex(params["token"]), bytes.fromhex(params["session_secret"]))
        region = lease.region
        cases = [(region.addr, 4096, region.rkey ^ 0x5A5A),            # bad key
                 (region.addr + region.length - 100, 4096, region.rkey),  # past the end
                 (region.addr - 4096, 4096, region.rkey)]                 # before the start
        for batch, (addr, length, rkey) in enumerate(cases, 1):
            ops = np.zeros(1, dtype=wire.WIRE_OP)
            ops[0]["remote_addr"], ops[0]["length"], ops[0]["rkey"], ops[0]["opcode"] = addr, length, rkey, 0
            sock.sendall(wire.request(batch, ops, key=key, seq=batch - 1))
        dec = wire.Decoder(wire.TO_REQUESTER)
        got = []
        while len(got) < len(cases):
            ev = dec.next_event()
            if ev is None:
                n = sock.recv_into(dec.writable())
                assert n, "provider closed the connection on an error completion"
                dec.wrote(n)
                continue
            if not isinstance(ev, wire.HelloOk):
                got.append(ev)
        assert [ev.status for ev in got] == [10, 10, 10]  # IBV_WC_REM_ACCESS_ERR each, connection alive
        sock.close()
        c.free_slab(lease.lease_id)
    assert cluster.alive("p0")


def test_rram_connect_is_the_composition_root(cluster):
    """``import rram; rram.connect(...)``: the public door opens the same store as open_store."""
    import rram

    with pytest.raises(TypeError, match="local_buget"):
        rram.connect(cluster.config, name="face", local_buget=1 << 20)
    n = 1024  # 4 MiB of pages through a 256 KiB local budget: most go to the two providers
    data = make_pages(n, seed=9)
    with rram.connect(cluster.config_path, name="face", transport="tcp", local_budget=256 << 10,
                      replicas=2) as store:
        assert store.transport == "tcp" and store.requester == "face"
        pool = store.create_pool(persistent=True)
        store.put_many(pool, 1, np.arange(n), data)
        out = np.zeros_like(data)
        assert store.get_many(pool, 1, np.arange(n), out).all()
        assert np.array_equal(page_checksums(out, n), page_checksums(data, n))
        assert store.stats()["remote_pages"] > n // 2
