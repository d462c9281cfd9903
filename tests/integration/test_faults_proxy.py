"""The fault proxy itself, against a real provider process: each fault does what it says."""
from __future__ import annotations

import time

import numpy as np
import pytest

from rram import PAGE_SIZE, errors
from rram.control import keys
from rram.control.client import ProviderClient
from rram.cluster import open_store
from rram.testing.faultproxy import ProviderProxy
from rram.testing.pages import make_pages, page_checksums
from rram.tls import cluster_client_context

from .conftest import tcp_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    with tcp_cluster(n_providers=1, capacity="64MiB", replicas=1, workdir=str(tmp_path_factory.mktemp("fp")),
                     slab_size="4MiB", tls=False) as c:  # the proxy rewrites control frames
        yield c


@pytest.fixture
def px(one):
    with ProviderProxy(one.config, "p0", seed=1) as p:
        yield p


def client(px, timeout=5.0):
    c = ProviderClient(px.config.node("p0"), keys.credential(px.config, "proxy-test", "operator"),
                       tls=cluster_client_context(px.config), timeout=timeout)
    c.connect()
    return c


def timed(fn):
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def test_pages_go_through_the_proxy_on_both_ports_and_read_back(px):
    n = 3000
    data = make_pages(n, seed=3)
    with open_store(px.config, name="req", local_budget=1 << 20, keeper=False) as store:
        pool = store.create_pool()
        store.put_many(pool, 0, np.arange(n), data)
        out = np.zeros(n * PAGE_SIZE, dtype=np.uint8)
        assert store.get_many(pool, 0, np.arange(n), out).all()
        assert np.array_equal(page_checksums(out, n), page_checksums(data, n))
        assert store.stats()["remote_pages"] > 0
    assert px.control.accepted == 1
    assert [p.accepted for p in px.data.values()] == [1]  # the data endpoint was rewritten to the proxy


def test_delay_and_loss_slow_every_round_trip_until_healed(px):
    with client(px) as c:
        assert timed(c.heartbeat) < 0.1
        px.set(delay=0.1)
        assert timed(c.heartbeat) >= 0.2  # request and reply
        px.set(delay=0.0, loss=1.0, loss_stall=0.15)
        assert timed(c.heartbeat) >= 0.3
        px.heal()
        assert timed(c.heartbeat) < 0.1


def test_bandwidth_limit_paces_the_data_path(px):
    n = 256  # 1 MiB of incompressible pages, all remote
    data = np.random.default_rng(5).integers(0, 256, n * PAGE_SIZE, dtype=np.uint8)
    with open_store(px.config, name="req", local_budget=64 << 10, keeper=False) as store:
        pool = store.create_pool()
        store.put_many(pool, 0, np.arange(16), data[: 16 * PAGE_SIZE])  # lease and connect first
        px.set(bandwidth=2 << 20)
        took = timed(lambda: store.put_many(pool, 0, np.arange(n), data))
        assert took >= 0.4, f"1 MiB at 2 MiB/s took {took:.2f}s"
        px.heal()
        out = np.zeros(n * PAGE_SIZE, dtype=np.uint8)
        assert store.get_many(pool, 0, np.arange(n), out).all()
        assert np.array_equal(out, data)


def test_blackhole_holds_then_delivers(px):
    with client(px) as c:
        px.blackhole(0.6)
        took = timed(c.heartbeat)
        assert 0.5 <= took < 2.0
        assert timed(c.heartbeat) < 0.1


def test_reset_breaks_the_connection_at_once(px):
    with client(px) as c:
        assert px.reset() == 1
        with pytest.raises(errors.ConnectionLost):
            c.heartbeat()


def test_half_open_never_answers_and_new_connections_hang(px, one):
    with client(px, timeout=0.5) as c:
        px.half_open()
        took = time.monotonic()
        with pytest.raises(errors.ConnectionLost, match="did not answer"):
            c.heartbeat()
        assert 0.4 <= time.monotonic() - took < 2
        with pytest.raises(errors.ConnectionLost):
            client(px, timeout=0.5)
    px.heal()
    with client(px) as c:
        assert c.heartbeat()["state"] == "serving"
    assert one.alive("p0")


def test_the_proxy_refuses_anything_but_loopback(one):
    from rram.testing.faultproxy import FaultProxy

    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(("192.0.2.1", 80))
