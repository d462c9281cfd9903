"""Open a requester's PageStore on a cluster: control sessions, data endpoints, remote tier."""
from __future__ import annotations

import logging
import os
import socket

from .. import config as C
from .. import errors, transport
from .remote import Link, RemoteTier
from .store import PageStore

log = logging.getLogger(__name__)

#: remote virtual slab ids start here; local pool slabs use 1..REMOTE_SLAB_BASE-1
REMOTE_SLAB_BASE = 4096


def _requester_options(tname: str, cfg, name: str) -> dict:
    """Options of the requester-side transport; verbs takes device settings from our own node entry."""
    if tname != "verbs":
        return {}
    node = next((n for n in cfg.nodes if n.name == name), None)
    return {} if node is None else {"device": node.rdma_device, "gid_index": node.gid_index}


def link_provider(cfg, node, rt, credential) -> Link:
    """Authenticate to ``node``, open a data endpoint through its control connection."""
    from ..control.client import ProviderClient

    client = ProviderClient(node, credential)
    try:
        client.connect()
        ep = rt.endpoint()
        try:
            ep.connect(client.connect_data(ep.local_params()))
            ep.reconnect_params = client.connect_data
        except BaseException:
            ep.close()
            raise
    except BaseException:
        client.close()
        raise
    return Link(index=-1, name=node.name, client=client, endpoint=ep,
                failure_domain=getattr(node, "failure_domain", None))


def open_store(config, *, name: str | None = None, transport_name: str | None = None, **overrides) -> PageStore:
    """A PageStore for requester ``name`` on the cluster ``config`` (path or ClusterConfig).

    Overrides: local_budget, replicas, batch, keeper (default True: run the background
    control loop — heartbeats, failure handling, re-replication, repatriation).  Unreachable
    providers are skipped with a warning and linked when they come up.
    """
    transport_name = overrides.pop("transport", None) or transport_name
    cfg = config if not isinstance(config, (str, os.PathLike)) else C.load(config)
    requester = name or f"{socket.gethostname()}-{os.getpid()}"
    tname, why = transport.choose(transport_name or cfg.transport)
    log.info("requester %s: transport %s (%s)", requester, tname, why)
    rcfg = cfg.requester
    local_budget = overrides.pop("local_budget", None) or rcfg.local_budget
    replicas = overrides.pop("replicas", None) or cfg.replicas
    batch = overrides.pop("batch", None) or rcfg.remotify_batch
    run_keeper = overrides.pop("keeper", True)
    if overrides:
        raise TypeError(f"unknown options: {', '.join(overrides)}")
    rt = transport.requester_transport(tname, **_requester_options(tname, cfg, requester))
    remote = RemoteTier(slab_size=cfg.slab_size, replicas=replicas, first_slab_id=REMOTE_SLAB_BASE)
    credential = cfg.credential(requester, "requester")
    for node in cfg.providers():
        if node.name == requester:
            continue  # symmetric topology: never place our pages on ourselves
        try:
            remote.add_link(link_provider(cfg, node, rt, credential))
        except errors.AuthError:
            remote.close()
            raise
        except (errors.RramError, OSError) as exc:
            log.warning("provider %s unreachable, continuing without it: %s", node.name, exc)
    if remote.links and len(remote.links) < replicas:
        log.warning("only %d providers reachable for %d replicas: remote puts will fail until more join",
                    len(remote.links), replicas)
    store = PageStore(remote, local_budget=local_budget, batch=batch)
    store.transport = tname
    store.transport_reason = why
    store.requester = requester
    if run_keeper:
        from ..control.keeper import Keeper

        store.keeper = Keeper(store, cfg, lambda node: link_provider(cfg, node, rt, credential),
                              requester=requester).start()
    return store
