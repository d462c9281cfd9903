"""`rram requester`: export remote memory as an NBD block device (for swap, or any block use).

    rram requester --config cluster.yaml --name app1 --export-size 8GiB --socket /run/rram/nbd.sock
    nbd-client -unix /run/rram/nbd.sock /dev/nbd0 -b 4096 -swap      # scripts/requester.sh up
    mkswap /dev/nbd0 && swapon -p 100 /dev/nbd0

Over the network, the export runs TLS with client certificates::

    rram keys tls app1 --server --host 10.0.0.21 --out /etc/rram/nbd-tls --config cluster.yaml
    rram keys tls laptop --client --out laptop-tls --config cluster.yaml   # for each client
    rram requester ... --listen 10.0.0.21:10809 --nbd-tls /etc/rram/nbd-tls
    nbdinfo 'nbds://10.0.0.21/?tls-certificates=laptop-tls'

``--nbd-tls DIR`` holds ``server-cert.pem``, ``server-key.pem`` and ``ca-cert.pem`` (GnuTLS's
names, as qemu-nbd reads them): every connection, TCP or unix socket, must negotiate
NBD_OPT_STARTTLS and show a client certificate signed by ``ca-cert.pem``.  ``--listen`` on
an address other than loopback without ``--nbd-tls`` is refused: the export would hand the
whole device to anyone who can reach the port.

Connects the page store (``rram.cluster.open_store``, i.e. ``rram.connect``), creates a persistent pool (a page is never
dropped: a write fails with ENOSPC rather than lose data), serves it over NBD, locks its
memory (mlockall) unless --no-mlock, prints ``rram requester NAME ready ...`` once listening,
and on SIGTERM/SIGINT stops serving, flushes and closes the store.

Swap on NBD can deadlock: to write a page out under memory pressure the kernel needs this
process to run, and this process may need memory to do it.  What rram does: mlockall (no
page of the server is ever swapped out, including to itself), buffers allocated once per
connection, nbd-client ``-swap`` (PF_MEMALLOC for the socket).  What the operator must do:

* Put the memory limit on the *workload*, not the machine: run it in a cgroup with
  ``memory.max`` (or ``memory.high``) so that it swaps while the host still has free memory
  for the requester.  Machine-wide pressure (every cgroup out of memory) can still deadlock.
* Run the requester outside that cgroup (its own service), with enough RLIMIT_MEMLOCK
  (root, or ``LimitMEMLOCK=infinity`` in systemd) and ``OOMScoreAdjust=-1000``.
* Raise ``vm.min_free_kbytes`` (e.g. 1-2% of RAM, >= 128 MiB) so that the network stack
  can allocate while the kernel is reclaiming.
* Give the NBD swap a lower priority than local swap if any (``swapon -p``), or the highest
  if it is the only one; attach with ``-b 4096`` and tear down in order: swapoff, then
  ``nbd-client -d``, then stop the requester (scripts/requester.sh down).
* Size ``requester.local_budget`` so that the local compressed pool plus the providers'
  capacity covers the export size; otherwise writes fail with ENOSPC (an I/O error for swap).
"""
from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import logging
import os
import signal
import ssl
import sys
import threading

from .. import config as C
from .. import errors
from .. import tls as T
from .nbd.backend import PageStoreBackend
from .nbd.server import DEFAULT_SPIN_US, NBDServer, lock_all_memory

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="cluster file (YAML)")
    p.add_argument("--name", help="this requester's name (default: host-pid)")
    p.add_argument("--export-size", default="1GiB", metavar="SIZE")
    p.add_argument("--socket", metavar="PATH", help="serve NBD on this unix socket")
    p.add_argument("--listen", metavar="HOST:PORT", help="serve NBD on this TCP address (port 0: any)")
    p.add_argument("--export-name", default="", metavar="NAME", help="NBD export name (default: empty)")
    p.add_argument("--nbd-tls", metavar="DIR",
                   help="require TLS with client certificates: DIR has server-cert.pem, server-key.pem and "
                        "ca-cert.pem (`rram keys tls NAME --server --out DIR`); needed for a non-loopback --listen")
    p.add_argument("--no-mlock", action="store_true", help="do not mlockall (only when not backing swap)")
    p.add_argument("--nbd-spin-us", type=float, default=DEFAULT_SPIN_US, metavar="US",
                   help="poll a busy NBD connection up to this long before sleeping in recv, while polling "
                        f"catches requests (0: never; default {DEFAULT_SPIN_US}): trades a little CPU for latency")
    p.add_argument("--nbd-spin-fixed", action="store_true",
                   help="poll for --nbd-spin-us before every wait, whether or not it catches requests "
                        "(default: adaptive, off while the polls miss)")
    p.add_argument("--no-nbd-c-path", action="store_true",
                   help="serve every NBD request on the Python path, none in C (diagnosis, comparisons)")
    p.add_argument("--farmem-socket", metavar="PATH",
                   help="also serve far-memory regions (rram.FarMemory(..., service=PATH)) from this store")
    p.add_argument("--farmem-budget", default="256MiB", metavar="SIZE",
                   help="resident bytes all far-memory regions may hold together (default 256MiB)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus /metrics (the page store's counters) on 127.0.0.1:PORT (0: any)")


def _stats(store, server: NBDServer | None) -> dict:
    """The store's counters and the NBD server's (requests, runs, errors...) under "nbd"."""
    stats = store.stats()
    if server is not None:
        stats["nbd"] = dict(server.counters)
    return stats


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise errors.ConfigError(f"--listen expects HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def nbd_tls_context(directory: str) -> ssl.SSLContext:
    """The export's TLS context from a directory in GnuTLS naming; clients must show a certificate.

    TLS 1.2 is still accepted here (control connections take 1.3 only): Debian's nbd-client
    (3.24) asks GnuTLS for TLS 1.2 alone.  OpenSSL's defaults leave 1.2 with ECDHE and AEAD
    ciphers only."""
    path = functools.partial(os.path.join, directory)
    return T.server_context(path("server-cert.pem"), path("server-key.pem"), client_ca=path("ca-cert.pem"),
                            minimum=ssl.TLSVersion.TLSv1_2)


def main(args) -> int:
    """Run the requester until SIGTERM/SIGINT.  ``args``: an argparse Namespace or argv list."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="rram requester")
        add_arguments(parser)
        args = parser.parse_args(args)
    socket_path = args.socket
    listen = getattr(args, "listen", None)
    export_name = getattr(args, "export_name", "") or ""
    try:
        size = C.parse_size(args.export_size)
        tcp = _parse_listen(listen) if listen else None
        if not socket_path and not tcp:
            raise errors.ConfigError("give --socket PATH and/or --listen HOST:PORT")
        tls_dir = getattr(args, "nbd_tls", None)
        if tcp and not _is_loopback(tcp[0]) and not tls_dir:
            raise errors.ConfigError(f"--listen {tcp[0]} is reachable from other hosts: the export would serve the "
                                     "whole device to anyone there; give --nbd-tls DIR (TLS with client "
                                     "certificates) or listen on 127.0.0.1")
        tls_ctx = nbd_tls_context(tls_dir) if tls_dir else None
    except errors.ConfigError as exc:
        print(f"rram requester: {exc}", file=sys.stderr)
        return 2
    from ..cluster import open_store

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        store = open_store(args.config, name=args.name)
    except (errors.RramError, OSError) as exc:
        print(f"rram requester: cannot open the page store: {exc}", file=sys.stderr)
        return 1
    name = getattr(store, "requester", None) or args.name or f"pid{os.getpid()}"
    server = metrics = regions = None
    try:
        backend = PageStoreBackend(store, store.create_pool(persistent=True), obj=0, size=size)
        server = NBDServer(backend, export_name=export_name, description=f"rram requester {name}",
                           spin_us=getattr(args, "nbd_spin_us", DEFAULT_SPIN_US),
                           adaptive_spin=not getattr(args, "nbd_spin_fixed", False),
                           c_requests=not getattr(args, "no_nbd_c_path", False), tls=tls_ctx)
        where = []
        if socket_path:
            where.append(f"socket={server.listen_unix(socket_path)}")
        if tcp:
            host, port = server.listen_tcp(*tcp)
            where.append(f"listen={host}:{port}")
        if not getattr(args, "no_mlock", False):
            lock_all_memory()  # after the store's arenas exist, before the first client
        server.start()
        if getattr(args, "farmem_socket", None):
            from .farmem.service import RegionService  # the same store serves regions too

            regions = RegionService(store, args.farmem_socket, C.parse_size(args.farmem_budget))
            threading.Thread(target=regions.serve_forever, name="farmem-service", daemon=True).start()
            where.append(f"farmem={args.farmem_socket}")
        if getattr(args, "metrics_port", None) is not None:
            from ..metrics import serve_metrics

            metrics = serve_metrics(args.metrics_port, "rram_requester", lambda: _stats(store, server),
                                    labels={"requester": name})
            where.append(f"metrics=127.0.0.1:{metrics.port}")
        if tls_ctx is not None:
            where.append("tls=required")
        print(f"rram requester {name} ready {' '.join(where)} size={size} export={export_name!r} "
              f"transport={getattr(store, 'transport', '?')}", flush=True)
        while not stop.wait(1.0):
            pass
        log.info("requester %s: stopping", name)
        return 0
    except (errors.RramError, OSError) as exc:
        print(f"rram requester: {exc}", file=sys.stderr)
        return 1
    finally:
        if regions is not None:
            regions.close()
        if metrics is not None:
            metrics.close()
        if server is not None:
            server.close()
        print(f"rram requester {name} stats {json.dumps(_stats(store, server), default=str)}", flush=True)
        try:
            store.flush()
        except errors.RramError as exc:
            log.warning("flush at shutdown failed: %s", exc)
        store.close()


if __name__ == "__main__":
    from ..logsetup import configure_logging

    configure_logging(verbose=1, quiet=0)
    sys.exit(main(sys.argv[1:]))
