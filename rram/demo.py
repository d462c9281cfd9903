"""`rram demo`: the embedded default — a whole cluster on loopback, end to end.

Starts N provider processes with a generated config, opens a requester page store whose local
budget is far smaller than the data, puts a realistic mix of pages (zeros, text, binary, random),
reads every page back and verifies checksums, invalidates a part and checks that the space is
reused, prints the counters, and shuts everything down in order.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import errors
from .cluster import open_store
from .testing.cluster import LocalCluster
from .testing.pages import make_pages, page_checksums
from .units import PAGE_SIZE

log = logging.getLogger(__name__)

CHUNK = 4096  # pages per put_many/get_many call


def _parse_size(text) -> int:
    from .config import parse_size

    return parse_size(text)


def run(providers: int = 2, pages: int = 200_000, budget: int = 32 << 20, transport: str = "tcp",
        capacity: int = 512 << 20, console: Console | None = None) -> dict:
    """Run the demo; returns the requester's counters. Raises on any lost or corrupt page."""
    console = console or Console()
    t0 = time.monotonic()
    console.print(f"[bold]rram demo[/]: {providers} providers on loopback, {pages} pages "
                  f"({pages * PAGE_SIZE >> 20} MiB) through a {budget >> 20} MiB local budget")
    data = make_pages(pages, seed=2026)
    sums = page_checksums(data, pages)
    with LocalCluster(n_providers=providers, capacity=capacity, transport=transport) as cluster:
        console.print(f"providers up: {', '.join(cluster.providers)} (config {cluster.config_path})")
        with open_store(cluster.config_path, name="demo-requester", local_budget=budget) as store:
            console.print(f"transport: {store.transport} ({store.transport_reason}), "
                          f"{store.stats().get('replicas', 1)} copies of every remote page")
            pool = store.create_pool(persistent=True)
            with _progress(console) as progress:
                _phase(progress, "put", pages, lambda s, e: store.put_many(
                    pool, 0, np.arange(s, e, dtype=np.uint64), data[s * PAGE_SIZE : e * PAGE_SIZE]))
                back = np.zeros_like(data)
                _phase(progress, "get + verify", pages, lambda s, e: _get_verify(
                    store, pool, s, e, back, sums))
                # invalidate every other page of the first half and write new ones in its place
                half = np.arange(0, pages // 2, 2, dtype=np.uint64)
                before = store.stats()
                store.invalidate_pages(pool, 0, half)
                fresh = make_pages(len(half), seed=7)
                store.put_many(pool, 0, half, fresh)
                after = store.stats()
                got = np.zeros_like(fresh)
                store.get_many(pool, 0, half, got)
                if not np.array_equal(page_checksums(got, len(half)), page_checksums(fresh, len(half))):
                    raise errors.CorruptDataError("pages rewritten after invalidation came back different")
            stats = store.stats()
            _print_counters(console, stats)
            console.print(f"invalidated and rewrote {len(half)} pages: leased "
                          f"{before.get('remote_leased_bytes', 0) >> 20} MiB before, "
                          f"{after.get('remote_leased_bytes', 0) >> 20} MiB after (freed space reused)")
            for name, pstats in _provider_stats(cluster).items():
                console.print(f"provider {name}: {pstats}")
    console.print(f"[bold green]OK[/]: {pages} pages verified, 0 lost, {time.monotonic() - t0:.1f}s")
    return stats


def _get_verify(store, pool, s, e, back, sums):
    out = back[s * PAGE_SIZE : e * PAGE_SIZE]
    found = store.get_many(pool, 0, np.arange(s, e, dtype=np.uint64), out)
    if not found.all():
        raise errors.CorruptDataError(f"{int((~found).sum())} pages missing in {s}..{e}")
    bad = np.flatnonzero(page_checksums(out, e - s) != sums[s:e])
    if len(bad):
        raise errors.CorruptDataError(f"{len(bad)} pages corrupt, first at index {s + int(bad[0])}")


def _progress(console):
    return Progress(TextColumn("{task.description:>14}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=False)


def _phase(progress, name, pages, fn):
    task = progress.add_task(name, total=pages, rate="")
    t = time.monotonic()
    for s in range(0, pages, CHUNK):
        e = min(pages, s + CHUNK)
        fn(s, e)
        rate = e / max(1e-9, time.monotonic() - t)
        progress.update(task, completed=e, rate=f"{rate / 1000:.0f}k pages/s")


def _print_counters(console, stats):
    table = Table(title="requester counters", show_header=True)
    table.add_column("counter")
    table.add_column("value", justify="right")
    for key in ("puts", "succ_puts", "failed_puts", "gets", "succ_gets", "failed_gets", "local_gets",
                "remote_gets", "pages_remoted", "remotify_batches", "invalidates", "pages",
                "local_pages", "remote_pages", "zero_pages", "compressed_bytes", "compression_ratio",
                "replicas", "remote_slabs", "remote_leased_bytes", "metadata_bytes", "codec"):
        if key in stats:
            table.add_row(key, str(stats[key]))
    console.print(table)


def _provider_stats(cluster) -> dict:
    try:
        stats = cluster.provider_stats("demo-status")
    except (errors.RramError, OSError) as exc:
        log.warning("provider stats unavailable: %s", exc)
        return {}
    return {name: {k: s[k] for k in ("capacity", "used", "leases")} for name, s in stats.items()}


def main(args) -> int:
    try:
        run(providers=args.providers, pages=args.pages, budget=_parse_size(args.budget), transport=args.transport)
    except errors.RramError as exc:
        Console(stderr=True).print(f"[bold red]demo failed[/]: {exc}")
        return 1
    return 0
