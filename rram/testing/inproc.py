"""Providers inside the test process, for fast unit tests of the page store.

Real arenas and a real transport session (loopback by default); only the control connection
is a direct method call instead of a socket.  Integration tests use real provider processes
(rram/testing/cluster.py).  Like all of rram/testing, this module sits above every other layer
and may import any of them (here: the composition root's linking, and the NBD backends).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass

from .. import errors, transport
from ..cluster import link
from ..datapath.remote import RemoteTier
from ..datapath.store import PageStore
from ..frontends.nbd.backend import MemoryBackend, PageStoreBackend
from ..memory import Arena
from ..transport.base import RemoteRegion


@dataclass
class InProcessLease:
    lease_id: int
    region: RemoteRegion


class InProcessProvider:
    def __init__(self, name: str, capacity: int, transport_name: str = "loopback"):
        self.name = name
        self.capacity = capacity
        self.used = 0
        self.pt = transport.provider_transport(transport_name)
        self.leases: dict[int, tuple[Arena, int, object]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.alive = True

    def client(self, requester: str) -> InProcessClient:
        return InProcessClient(self, self.pt.open_session(requester))

    def kill(self) -> None:
        """Lose everything at once, like a crashed node."""
        self.alive = False
        self.pt.close()

    def close(self) -> None:
        if self.alive:
            self.kill()


class InProcessClient:
    """Same methods as rram.control.client.ProviderClient."""

    def __init__(self, provider: InProcessProvider, session):
        self.p = provider
        self.session = session
        self.mine: set[int] = set()

    def _check(self):
        if not self.p.alive:
            raise errors.ConnectionLost(f"provider {self.p.name} is gone")

    def connect(self):
        self._check()

    def alloc_slab(self, size: int) -> InProcessLease:
        self._check()
        with self.p._lock:
            if self.p.used + size > self.p.capacity:
                raise errors.CapacityError(f"{self.p.name}: {size} bytes would exceed capacity {self.p.capacity}")
            arena = Arena(size)
            rkey = self.session.register(arena.addr, size)
            lease = next(self.p._ids)
            self.p.leases[lease] = (arena, rkey, self.session)
            self.p.used += size
        self.mine.add(lease)
        return InProcessLease(lease, RemoteRegion(arena.addr, size, rkey))

    def free_slab(self, lease: int) -> None:
        self._check()
        with self.p._lock:
            arena, rkey, session = self.p.leases.pop(lease)
            session.deregister(rkey)
            arena.close()
            self.p.used -= arena.length
        self.mine.discard(lease)

    def connect_data(self, params: dict) -> dict:
        self._check()
        return self.session.accept(params)

    def heartbeat(self) -> dict:
        self._check()
        return {"free": self.p.capacity - self.p.used, "capacity": self.p.capacity}

    def stats(self) -> dict:
        return {"capacity": self.p.capacity, "used": self.p.used, "leases": len(self.p.leases)}

    def close(self) -> None:
        if self.p.alive:
            for lease in list(self.mine):
                self.free_slab(lease)
        self.session.close()

    def abort(self) -> None:
        """Hang up without a goodbye (a provider declared dead): its leases stay until reclaimed."""
        self.session.close()


def make_store(providers: list[InProcessProvider], *, replicas: int = 1, slab_size: int = 1 << 20,
               local_budget: int = 1 << 20, batch: int = 256, requester: str = "test",
               seal: bool = True) -> PageStore:
    """A PageStore over in-process providers, linked by the same code as rram.connect."""
    rt = transport.requester_transport(providers[0].pt.name if providers else "loopback")
    remote = RemoteTier(slab_size=slab_size, replicas=replicas)
    for p in providers:
        remote.add_link(link(p.client(requester), rt, p.name))
    return PageStore(remote, local_budget=local_budget, batch=batch, seal=seal, requester=requester)


@contextlib.contextmanager
def export_backend(kind: str, size: int):
    """An NBD backend for tests: ``"memory"`` (a bytearray) or ``"pagestore"`` (a persistent pool
    of a store whose small local budget spills most pages to one in-process provider)."""
    if kind == "memory":
        yield MemoryBackend(size)
        return
    provider = InProcessProvider("p0", 8 << 20)
    store = make_store([provider], local_budget=128 << 10, slab_size=1 << 20)
    try:
        yield PageStoreBackend(store, store.create_pool(persistent=True), obj=1, size=size)
    finally:
        store.close()
        provider.close()
