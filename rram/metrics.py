"""Prometheus ``/metrics`` for providers and requesters, from the same stats dicts `rram status` shows.

A collector reads the stats function at scrape time (nothing is counted twice); every numeric
entry becomes a gauge ``<prefix>_<key>`` (nested dicts flatten with ``_``), with constant labels
such as the node name.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)
_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, (int, float)):
        out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}_{_BAD.sub('_', str(k))}", v, out)


class StatsCollector:
    def __init__(self, prefix: str, stats: Callable[[], dict], labels: dict[str, str] | None = None):
        self.prefix = prefix
        self.stats = stats
        self.labels = labels or {}

    def collect(self):
        flat: dict[str, float] = {}
        try:
            _flatten(self.prefix, self.stats(), flat)
        except Exception as exc:  # a scrape must never take the daemon down
            log.warning("metrics: stats failed: %s", exc)
            return
        names, values = list(self.labels), list(self.labels.values())
        for name, value in sorted(flat.items()):
            g = GaugeMetricFamily(name, f"rram stat {name[len(self.prefix) + 1:]}", labels=names)
            g.add_metric(values, value)
            yield g


class MetricsServer:
    def __init__(self, server, thread, port: int):
        self._server = server
        self._thread = thread
        self.port = port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(port: int, prefix: str, stats: Callable[[], dict], *, host: str = "127.0.0.1",
                  labels: dict[str, str] | None = None) -> MetricsServer:
    """Serve ``/metrics`` on host:port (0: any free port) from ``stats()``; returns the server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(prefix, stats, labels))
    server, thread = start_http_server(port, addr=host, registry=registry)
    actual = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, actual)
    return MetricsServer(server, thread, actual)
