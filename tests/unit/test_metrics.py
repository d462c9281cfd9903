"""Prometheus /metrics from a live page store's counters, scraped over HTTP."""
from __future__ import annotations

import urllib.request

from rram.metrics import serve_metrics
from rram.testing.inproc import InProcessProvider, make_store


def test_metrics_endpoint_serves_store_counters():
    p = InProcessProvider("p0", 16 << 20)
    with make_store([p]) as store:
        pool = store.create_pool()
        store.put(pool, 0, 0, b"x" * 4096)
        server = serve_metrics(0, "rram_requester", store.stats, labels={"requester": "t"})
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
        finally:
            server.close()
    p.close()
    assert 'rram_requester_succ_puts{requester="t"} 1.0' in body
    assert "rram_requester_codec" not in body  # non-numeric entries are left out
    assert "rram_requester_local_pages" in body
