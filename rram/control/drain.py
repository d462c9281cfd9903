"""`rram drain NODE`: move every page off a provider, with a progress bar, then let it exit.

The provider stops leasing (state "draining"); every requester's keeper sees the state in the
next heartbeat and moves its slabs elsewhere (copy, then release); the bar follows the bytes
still leased on NODE.  When none are left the provider is asked to exit (``--keep-running``
leaves it up, draining).
"""
from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from .. import config as C
from .. import errors
from . import keys
from ..tls import cluster_client_context
from .client import ProviderClient


def drain(cfg, node_name: str, *, timeout: float = 3600.0, poll: float = 0.5, exit_after: bool = True,
          progress: Progress | None = None, operator: str = "operator") -> dict:
    """Drain ``node_name``; returns its final stats. Raises RramError on timeout."""
    node = cfg.node(node_name)
    with ProviderClient(node, keys.credential(cfg, operator, "operator"), tls=cluster_client_context(cfg)) as client:
        client.connect()
        client.drain()
        start = client.stats()["used"]
        task = progress.add_task(f"draining {node_name}", total=max(start, 1)) if progress else None
        deadline = time.monotonic() + timeout
        while True:
            stats = client.stats()
            if progress is not None:
                progress.update(task, completed=start - min(start, stats["used"]))
            if stats["used"] == 0:
                break
            if time.monotonic() > deadline:
                raise errors.RramError(f"{node_name} still holds {stats['used']} bytes after {timeout}s: "
                                       "is a requester with pages there running?")
            time.sleep(poll)
        if exit_after:
            client.shutdown()
        return stats


def main(args) -> int:
    try:
        cfg = C.load(args.config)
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                      TimeElapsedColumn()) as progress:
            drain(cfg, args.node, timeout=args.timeout, exit_after=not args.keep_running, progress=progress,
                  operator=args.as_)
    except errors.RramError as exc:
        print(f"rram drain: {exc}", file=sys.stderr)
        return 1
    print(f"rram drain: {args.node} holds no pages" + ("" if args.keep_running else " and is exiting"))
    return 0
