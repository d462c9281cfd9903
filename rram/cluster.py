"""The composition root: a requester's PageStore wired to a cluster (``rram.connect``).

This is the one module that knows datapath, control and transport together: it authenticates
to each provider (control), opens a data endpoint through that control connection
(transport), hands the links to the remote tier and the page store (datapath), and starts the
keeper (control) that drives the store's repair mechanisms.  Neither datapath nor control
imports the other; both are wired here, and only frontends, testing and the CLI sit above.
"""
from __future__ import annotations

import logging
import os
import socket

from . import config as C
from . import errors
from .control import keys
from .control.client import ProviderClient
from .control.keeper import Keeper, control_timeout
from .datapath.remote import Link, RemoteTier
from .datapath.store import PageStore
from .tls import cluster_client_context
from .transport import choose, requester_transport

log = logging.getLogger(__name__)


def _requester_options(tname: str, cfg, name: str) -> dict:
    """Options of the requester-side transport; verbs takes device settings from our own node entry."""
    if tname != "verbs":
        return {}
    node = next((n for n in cfg.nodes if n.name == name), None)
    return {} if node is None else {"device": node.rdma_device, "gid_index": node.gid_index}


def link(client, rt, name: str, failure_domain: str | None = None) -> Link:
    """A Link over ``client`` (a connected ProviderClient, or anything with its methods): open a
    data endpoint on ``rt`` and connect it with the parameters the provider returns."""
    ep = rt.endpoint()
    try:
        ep.connect(client.connect_data(ep.local_params()))
        ep.reconnect_params = client.connect_data  # recover() asks the provider again
    except BaseException:
        ep.close()
        raise
    return Link(index=-1, name=name, client=client, endpoint=ep, failure_domain=failure_domain)


def link_provider(node, rt, credential, tls, timeout: float = 5.0) -> Link:
    """Authenticate to provider ``node`` (a NodeConfig) with ``credential`` (over TLS with the
    client context ``tls``, or plaintext when None) and link it;
    ``timeout`` bounds each control request (``control_timeout(cfg)`` in a store)."""
    client = ProviderClient(node, credential, tls=tls, timeout=timeout)
    try:
        client.connect()
        return link(client, rt, node.name, node.failure_domain)
    except BaseException:
        client.close()
        raise


def open_store(config, *, name: str | None = None, transport: str | None = None, local_budget: int | None = None,
               replicas: int | None = None, batch: int | None = None, keeper: bool = True,
               seal: bool | None = None) -> PageStore:
    """A PageStore for requester ``name`` (default host-pid) on the cluster ``config`` (a path
    or a ClusterConfig).  ``transport`` overrides the cluster file's; ``local_budget``,
    ``replicas`` and ``batch`` override its requester settings, ``seal`` its ``seal``; ``keeper=False`` runs without
    the background control loop (heartbeats, failure handling, re-replication, repatriation).
    Unreachable providers are skipped with a warning and linked when they come up.
    """
    cfg = config if not isinstance(config, (str, os.PathLike)) else C.load(config)
    requester = name or f"{socket.gethostname()}-{os.getpid()}"
    tname, why = choose(transport or cfg.transport)
    log.info("requester %s: transport %s (%s)", requester, tname, why)
    replicas = replicas or cfg.replicas
    if replicas < cfg.min_replicas:
        raise errors.ConfigError(f"{cfg.source}: replicas={replicas} is below min_replicas={cfg.min_replicas}")
    rt = requester_transport(tname, **_requester_options(tname, cfg, requester))
    # a replica that has not completed a batch within half the suspect threshold is suspended
    # (then resumed or declared dead by the keeper's heartbeats): a read goes on to another
    # replica, a write completes on the others and the suspended copy is resynced if it resumes.
    # So a hung provider stalls one operation for about half the suspect threshold, plus the
    # re-post: within the threshold, whether the operation reads or writes.
    remote = RemoteTier(slab_size=cfg.slab_size, replicas=replicas, io_timeout=cfg.suspect_threshold / 2,
                        min_replicas=cfg.min_replicas,
                        suspension_wait=cfg.dead_threshold + 2 * cfg.heartbeat_interval)
    credential = keys.credential(cfg, requester, "requester")
    tls = cluster_client_context(cfg)  # one context for every control connection of this store
    timeout = control_timeout(cfg)
    for node in cfg.providers():
        if node.name == requester:
            continue  # symmetric topology: never place our pages on ourselves
        try:
            remote.add_link(link_provider(node, rt, credential, tls, timeout))
        except errors.AuthError:
            remote.close()
            raise
        except (errors.RramError, OSError) as exc:
            log.warning("provider %s unreachable, continuing without it: %s", node.name, exc)
    if remote.links and len(remote.links) < replicas:
        log.warning("only %d providers reachable for %d replicas: remote puts will fail until more join",
                    len(remote.links), replicas)
    store = PageStore(remote, local_budget=local_budget or cfg.requester.local_budget,
                      batch=batch or cfg.requester.remotify_batch, seal=cfg.seal if seal is None else seal,
                      requester=requester)
    store.transport = tname
    store.transport_reason = why
    store.requester = requester
    if keeper:
        store.keeper = Keeper(store, cfg, lambda node: link_provider(node, rt, credential, tls, timeout),
                              requester=requester).start()
    return store
