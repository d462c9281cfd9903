"""`rram reclaim NODE BYTES`: a provider's host needs memory back (memory pressure).

The provider lowers its capacity to BYTES below what it leases now (no new leases beyond
it; its slabs are mapped only while leased, so this is memory the host gets back) and asks
every requester, in its heartbeat replies, for its share of what is leased beyond the new capacity;
each requester's keeper drops its ephemeral pages there first (they simply miss later), then
moves slabs elsewhere as in a drain.  This command waits until the provider holds no more
than its new capacity.
"""
from __future__ import annotations

import sys
import time

from .. import config as C
from .. import errors
from . import keys
from ..tls import cluster_client_context
from .client import ProviderClient


def reclaim(cfg, node_name: str, nbytes: int, *, timeout: float = 600.0, poll: float = 0.5,
            operator: str = "operator") -> dict:
    """Reclaim ``nbytes`` on ``node_name`` and wait until it is within capacity; its final stats."""
    with ProviderClient(cfg.node(node_name), keys.credential(cfg, operator, "operator"),
                        tls=cluster_client_context(cfg)) as client:
        client.connect()
        client.reclaim(nbytes)
        deadline = time.monotonic() + timeout
        while True:
            stats = client.stats()
            if stats["used"] <= stats["capacity"]:
                return stats
            if time.monotonic() > deadline:
                raise errors.RramError(f"{node_name} still leases {stats['used'] - stats['capacity']} bytes beyond "
                                       f"its capacity after {timeout:g}s: are its requesters running?")
            time.sleep(poll)


def main(args) -> int:
    try:
        cfg = C.load(args.config)
        nbytes = C.parse_size(args.bytes)
        stats = reclaim(cfg, args.node, nbytes, timeout=args.timeout)
    except ValueError as exc:
        print(f"rram reclaim: BYTES: {exc}", file=sys.stderr)
        return 2
    except errors.RramError as exc:
        print(f"rram reclaim: {exc}", file=sys.stderr)
        return 1
    print(f"rram reclaim: {args.node} now leases {C.format_size(stats['used'])} of "
          f"{C.format_size(stats['capacity'])}")
    return 0
