"""One process serving the far-memory regions of every process on the machine.

    python -m rram.frontends.farmem.service --config cluster.yaml --socket /run/rram/farmem.sock \\
        --budget 4GiB [--name NODE] [--local-budget 1GiB]
    FarMemory(None, size=..., budget=..., service="/run/rram/farmem.sock")

Instead of a handler process per region (handler.py), regions connect to this service's Unix
socket and send the same hello (userfaultfd, memfd, lifeline by SCM_RIGHTS).  All of them share
one PageStore: one set of provider connections, one local compressed pool, and one resident
budget: a region is admitted only while the budgets of the regions served add up to at most
``--budget`` (refused with the numbers otherwise).  Each region is served by a thread of its
own running handler.run (and the region's fetcher and writer threads, handler.Region); the
service's GIL is never one the regions' processes need.  If the
service dies, every region it serves fails loudly (their lifelines hang up).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

from ... import config as C
from ... import errors
from ...logsetup import configure_logging
from . import wire as W
from .handler import Region, recv_hello, run

log = logging.getLogger(__name__)


class RegionService:
    """Accepts regions on ``path`` and serves them from ``store`` under ``budget`` bytes."""

    def __init__(self, store, path: str, budget: int):
        self.store, self.path, self.budget = store, path, budget
        self.committed = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise errors.ConfigError(f"{path}: another far-memory service is serving there")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # a stale socket of a previous run
            finally:
                probe.close()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.listener.settimeout(0.5)

    def serve_forever(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                raise
            t = threading.Thread(target=self._serve_region, args=(conn,), daemon=True, name="farmem-region")
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def close(self) -> None:
        self._closing.set()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _admit(self, want: int) -> str | None:
        with self._lock:
            if self.committed + want > self.budget:
                return (f"the service's budget is {C.format_size(self.budget)}, {C.format_size(self.committed)} "
                        f"of it committed to other regions: {C.format_size(want)} more does not fit")
            self.committed += want
            return None

    def _serve_region(self, conn: socket.socket) -> None:
        reader = W.Reader(conn)
        with conn:
            try:
                hello, fds = recv_hello(reader)
            except (errors.ProtocolError, OSError) as exc:
                log.warning("far-memory service: a client sent no valid hello: %s", exc)
                return
            want = C.parse_size(hello.get("budget", 0))
            refused = self._admit(want)
            if refused:
                for fd in fds:
                    os.close(fd)
                W.send(conn, {"ok": False, "error": refused})
                return
            try:
                try:
                    region = Region(hello, fds, self.store, batch=self.store.batch)
                except Exception as exc:  # noqa: BLE001 - reported to the region's process
                    for fd in fds:
                        os.close(fd)
                    W.send(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
                    return
                W.send(conn, {"ok": True, "pid": os.getpid()})
                end = "failed"
                try:
                    end = run(region, conn, reader, int(hello.get("spin_us", 0)))
                finally:
                    region.close()
            finally:
                with self._lock:
                    self.committed -= want
            if end == "close":  # answered once the budget is free again
                W.send(conn, {"ok": True})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rram.frontends.farmem.service")
    ap.add_argument("--config", required=True, help="cluster file")
    ap.add_argument("--socket", required=True, metavar="PATH", help="Unix socket the regions connect to")
    ap.add_argument("--budget", required=True, help="resident bytes for all regions together (e.g. 4GiB)")
    ap.add_argument("--name", help="this requester's node name (default host-pid)")
    ap.add_argument("--local-budget", help="the store's local compressed pool (default: the cluster file's)")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    configure_logging(args.verbose, 0)
    from ...cluster import open_store

    try:
        budget = C.parse_size(args.budget)
        local = C.parse_size(args.local_budget) if args.local_budget else None
        store = open_store(args.config, name=args.name, local_budget=local)
    except errors.RramError as exc:
        print(f"farmem service: {exc}", file=sys.stderr)
        return 2
    try:
        service = RegionService(store, args.socket, budget)
    except (errors.RramError, OSError) as exc:
        print(f"farmem service: {exc}", file=sys.stderr)
        store.close()
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.close())
    print(f"rram farmem service ready socket={args.socket} budget={C.format_size(budget)}", flush=True)
    try:
        service.serve_forever()
    finally:
        service.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
