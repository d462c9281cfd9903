"""The `rram` command: provider, status, demo, requester, drain, undrain, reload, keys, reclaim.

Logging is configured here (rram/logsetup.py), never by the modules a subcommand runs.
Subcommands written in other modules are imported when used, so the CLI works (and says
clearly what is missing) in a partial build.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .logsetup import configure_logging

MISSING_MODULE_EXIT = 2


def _lazy(module: str, func: str = "main"):
    """A handler that imports ``module`` only when its subcommand runs."""

    def run(args) -> int:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
                print(f"rram {args.command}: not available in this build ({module} is missing)", file=sys.stderr)
                return MISSING_MODULE_EXIT
            raise
        return getattr(mod, func)(args)

    return run


def _provider(args) -> int:
    from .provider.server import main

    return main(args)


def _status(args) -> int:
    """Ask every provider for its stats; exit 1 when any is unreachable."""
    import json
    import os
    import socket

    from . import config as C
    from . import errors
    from .control import keys
    from .control.client import ProviderClient
    from .tls import cluster_client_context

    try:
        cfg = C.load(args.config)
        credential = keys.credential(cfg, args.as_, "operator")
        tls = cluster_client_context(cfg)
    except errors.RramError as exc:
        print(f"rram status: {exc}", file=sys.stderr)
        return 1
    results: dict[str, dict] = {}
    for node in cfg.providers():
        client = ProviderClient(node, credential, tls=tls, timeout=args.timeout)
        try:
            client.connect()
            results[node.name] = client.stats()
        except (errors.RramError, OSError) as exc:
            results[node.name] = {"error": str(exc)}
        finally:
            client.close()
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        _status_table(cfg, results)
    return 1 if any("error" in r for r in results.values()) else 0


def _status_table(cfg, results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from .config import format_size

    table = Table(title=f"cluster {cfg.name}")
    right = ("incarnation", "capacity", "used", "free", "leases", "sessions", "degraded", "read", "written", "uptime")
    for col in ("node", "control", "state", "transport") + right:
        table.add_column(col, justify="right" if col in right else "left")
    problems, detail = [], []
    for node in cfg.providers():
        r = results[node.name]
        where = f"{node.address}:{node.port}"
        if "error" in r:
            table.add_row(node.name, where, "[red]unreachable[/]", *[""] * 11)
            problems.append(f"{node.name}: {r['error']}")
            continue
        # degraded: the most slabs with too few copies that one of its requesters reports
        degraded = max((s.get("degraded", 0) for s in r.get("per_session", [])), default=0)
        table.add_row(node.name, where, r["state"], r["transport"], str(r["incarnation"]), format_size(r["capacity"]),
                      format_size(r["used"]), format_size(r["free"]), str(r["leases"]), str(r["sessions"]),
                      f"[yellow]{degraded}[/]" if degraded else "0",
                      f"{r.get('bytes_read', 0) / 2**20:.1f}MiB", f"{r.get('bytes_written', 0) / 2**20:.1f}MiB",
                      f"{r['uptime']:.0f}s")
        for s in r.get("per_session", []):
            if s["leases"]:
                detail.append(f"{node.name} <- {s['requester']}: {s['leases']} leases, {format_size(s['bytes'])}"
                              + (f", {s['degraded']} degraded slabs" if s.get("degraded") else "")
                              + ("" if s["connected"] else f", detached {s['detached_for']}s"))
    console = Console(width=None if sys.stdout.isatty() else 160)  # pipes and logs get whole lines
    console.print(table)
    for line in detail:
        console.print(line, soft_wrap=True)
    for line in problems:
        console.print(f"[red]{line}[/]", soft_wrap=True)


def _operator_request(args) -> int:
    """``rram undrain NODE`` / ``rram reload``: one operator request to one or every provider."""
    from . import config as C
    from . import errors
    from .control import keys
    from .control.client import ProviderClient
    from .tls import cluster_client_context

    try:
        cfg = C.load(args.config)
        credential = keys.credential(cfg, args.as_, "operator")
        nodes = [cfg.node(args.node)] if getattr(args, "node", None) else cfg.providers()
        tls = cluster_client_context(cfg)
    except errors.RramError as exc:
        print(f"rram {args.command}: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for node in nodes:
        try:
            with ProviderClient(node, credential, tls=tls, timeout=args.timeout) as client:
                client.connect()
                result = client.undrain() if args.command == "undrain" else f"{client.reload()} sessions cut"
            print(f"rram {args.command}: {node.name}: {result}")
        except (errors.RramError, OSError) as exc:
            print(f"rram {args.command}: {node.name}: {exc}", file=sys.stderr)
            failed = 1
    return failed


def _as_option(p) -> None:
    p.add_argument("--as", dest="as_", default="operator", metavar="NAME",
                   help="the operator identity to use: keys_dir/NAME.key, or derived where the master key is "
                        "(default operator)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rram", description="Remote memory over RDMA or TCP.")
    parser.add_argument("--version", action="version", version=f"rram {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging (errors only)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("provider", help="run a memory provider daemon for one node of the cluster")
    p.add_argument("--config", required=True, help="cluster file (YAML)")
    p.add_argument("--name", required=True, help="this node's name in the cluster file")
    p.add_argument("--transport", choices=("auto", "tcp", "verbs", "loopback"),
                   help="override the cluster file's transport")
    p.add_argument("--io-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time a peer may take for the handshake or to finish a frame (default 10)")
    p.set_defaults(func=_provider)

    p = sub.add_parser("status", help="ask every provider for its counters")
    p.add_argument("--config", required=True, help="cluster file (YAML)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS", help="per provider (default 3)")
    _as_option(p)
    p.set_defaults(func=_status)

    p = sub.add_parser("demo", help="a whole cluster on loopback, end to end, with verified pages")
    p.add_argument("--providers", type=int, default=2, metavar="N")
    p.add_argument("--pages", type=int, default=200_000, metavar="N")
    p.add_argument("--budget", default="32MiB", metavar="SIZE", help="the requester's local budget")
    p.add_argument("--transport", default="tcp", metavar="NAME")
    p.set_defaults(func=_lazy("rram.demo"))

    p = sub.add_parser("requester", help="export remote memory as a block device (NBD)")
    from .frontends.requester import add_arguments

    add_arguments(p)
    p.set_defaults(func=_lazy("rram.frontends.requester"))

    p = sub.add_parser("reclaim", help="give memory of a provider back to its host (requesters drop "
                       "ephemeral pages there, then move slabs away)")
    p.add_argument("--config", required=True, help="cluster file (YAML)")
    p.add_argument("node", metavar="NODE")
    p.add_argument("bytes", metavar="BYTES", help="how much, e.g. 64MiB")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    p.set_defaults(func=_lazy("rram.control.reclaim"))

    p = sub.add_parser("drain", help="move every lease off a provider, then stop leasing there")
    p.add_argument("--config", required=True, help="cluster file (YAML)")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS")
    p.add_argument("--keep-running", action="store_true", help="leave the drained provider up")
    _as_option(p)
    p.set_defaults(func=_lazy("rram.control.drain"))

    p = sub.add_parser("undrain", help="let a draining provider lease again")
    p.add_argument("--config", required=True, help="cluster file (YAML)")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    _as_option(p)
    p.set_defaults(func=_operator_request)

    p = sub.add_parser("reload", help="providers re-read the cluster file: revoked keys are cut, quotas apply")
    p.add_argument("--config", required=True, help="cluster file (YAML)")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    _as_option(p)
    p.set_defaults(func=_operator_request)

    p = sub.add_parser("keys", help="create the master key, or a key file for a requester or operator")
    keys = p.add_subparsers(dest="keys_command", metavar="init|add|tls", required=True)
    k = keys.add_parser("init", help="write the master key to secret_file (providers only); with tls_dir, "
                        "the cluster CA and provider certificates")
    k.add_argument("--config", required=True, help="cluster file (YAML)")
    k = keys.add_parser("add", help="write keys_dir/NAME.key for a new identity")
    k.add_argument("--config", required=True, help="cluster file (YAML)")
    k.add_argument("name", metavar="NAME")
    k.add_argument("--role", required=True, choices=("requester", "operator", "provider"))
    k.add_argument("--out", metavar="FILE", help="write here instead of keys_dir/NAME.key")
    k = keys.add_parser("tls", help="certificates for the NBD export or an NBD client, signed by the cluster CA")
    k.add_argument("--config", required=True, help="cluster file (YAML)")
    k.add_argument("name", metavar="NAME", help="the certificate's name (a server's: the host clients dial)")
    side = k.add_mutually_exclusive_group(required=True)
    side.add_argument("--server", action="store_true", help="server-cert.pem/server-key.pem (rram requester)")
    side.add_argument("--client", action="store_true", help="client-cert.pem/client-key.pem (nbd-client, qemu)")
    k.add_argument("--host", action="append", metavar="HOST", help="another name or address of the server")
    k.add_argument("--out", required=True, metavar="DIR", help="directory to write (GnuTLS naming + ca-cert.pem)")
    p.set_defaults(func=_lazy("rram.control.keys"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
