"""An on-path attacker alters what a provider answers on a tcp data connection (real provider
processes; rram.testing.frametamper rewrites the stream in the fault proxy): a COMPLETION with
a flipped status, a replayed one, one whose MAC was stripped or cut short is never taken as a
result; the link is dropped as for any connection failure and the store keeps every page."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from rram import PAGE_SIZE
from rram.cluster import open_store
from rram.testing.faultproxy import ProviderProxy
from rram.testing.frametamper import MODES
from rram.testing.pages import make_pages, page_checksums

from .conftest import tcp_cluster

pytestmark = pytest.mark.integration
N = 768  # pages per put: several batches to each provider


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    with tcp_cluster(n_providers=2, capacity="64MiB", replicas=2, workdir=str(tmp_path_factory.mktemp("tamper")),
                     slab_size="1MiB", tls=False) as c:  # the proxy rewrites control frames
        yield c


@pytest.fixture
def px(two):
    with ProviderProxy(two.config, "p0", seed=1) as p:
        yield p


def _suspension(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if "suspended" in r.getMessage()]
    assert lines, "the tampered link was not suspended"
    return lines[0]


@pytest.mark.parametrize("seal", [False, True], ids=["plain", "sealed"])
@pytest.mark.parametrize("mode", MODES)
def test_a_tampered_completion_drops_the_link_and_no_page_is_lost(px, two, mode, seal, caplog):
    caplog.set_level(logging.WARNING, logger="rram")
    data = make_pages(2 * N, seed=len(mode))
    with open_store(px.config, name=f"req-{mode}-{seal}", local_budget=64 << 10, replicas=2, seal=seal,
                    keeper=False) as store:
        pool = store.create_pool()
        store.put_many(pool, 0, np.arange(N), data[: N * PAGE_SIZE])  # both links up, completions seen
        px.tamper(mode)
        store.put_many(pool, 0, np.arange(N, 2 * N), data[N * PAGE_SIZE :])  # acknowledged: must read back
        assert px.tampering.done == [mode]
        stats = store.stats()
        assert stats["providers"]["p0"] == "suspended" and stats["providers"]["p1"] == "alive"
        why = _suspension(caplog)
        if mode != "truncate-mac":  # a cut MAC misframes the stream: the next bytes fail it, or nothing comes
            assert "MAC" in why, why
        out = np.zeros(2 * N * PAGE_SIZE, dtype=np.uint8)
        assert store.get_many(pool, 0, np.arange(2 * N), out).all()
        assert np.array_equal(page_checksums(out, 2 * N), page_checksums(data, 2 * N))
    assert two.alive("p0") and two.alive("p1")  # the providers never noticed


def test_the_c_read_path_refuses_a_tampered_completion(px, caplog):
    """The store's C single-request path polls the link's core itself: a flipped completion
    there fails the link (Python suspends it) and the page is served from the other copy."""
    caplog.set_level(logging.WARNING, logger="rram")
    store_path = pytest.importorskip("rram._ext._reqpath", reason="built without liblz4: no C request path")
    data = make_pages(N, seed=9)
    with open_store(px.config, name="req-c", local_budget=64 << 10, replicas=2, seal=True, keeper=False) as store:
        pool = store.create_pool(persistent=True)
        store.put_many(pool, 0, np.arange(N), data)
        assert store.requests is not None
        px.tamper("flip-status")
        page = bytearray(PAGE_SIZE)
        outcomes = set()
        for i in range(N):  # C declines local pages; a remote one is read from either replica
            rc = store.requests.read((pool << 56) | i, page)
            outcomes.add(rc)
            if px.tampering.done:
                break
        assert px.tampering.done == ["flip-status"], f"no C read reached p0 (outcomes {outcomes})"
        assert rc == store_path.REQ["link_failed"]
        store.get(pool, 0, 0)  # Python takes the lock: it suspends what C saw fail
        assert store.stats()["providers"]["p0"] == "suspended"
        assert "MAC" in _suspension(caplog)
        out = np.zeros(N * PAGE_SIZE, dtype=np.uint8)
        assert store.get_many(pool, 0, np.arange(N), out).all()
        assert np.array_equal(page_checksums(out, N), page_checksums(data, N))
