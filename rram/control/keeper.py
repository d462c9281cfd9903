"""The requester's control loop: membership from heartbeats, failures, repair, repatriation.

One background thread per page store.  Each round it

1. heartbeats every provider it is linked to and feeds the replies into ``Membership``; a
   provider whose connection is refused or reset is dead at once (no need to wait for the
   dead threshold when the kernel already told us), one that merely stops answering goes
   suspect, then dead after ``dead_threshold``;
2. acts on membership events: dead -> stop using it now (its slabs become degraded);
   draining -> move every slab off it; joined / restarted / rejoined -> (re)connect and
   offer it for placement and repairs;
3. runs ``store.repair()`` for a bounded slice (re-replication and drain copying);
4. brings remote pages home at ``repatriate_rate`` pages/s while the local pool has room
   (RAMster's "frontswap selfshrinking").

Policy lives here; the store only exposes mechanisms (mark_dead, drain, repair, repatriate).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from .. import errors
from .membership import DEAD, Membership, NodeInfo
from .placement import Candidate, choose_targets
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)


class Keeper:
    def __init__(self, store, cfg, connect: Callable, *, requester: str, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, repair_slice: float = 0.05):
        self.store = store
        self.cfg = cfg
        self._connect = connect  # NodeConfig -> Link (authenticated, data endpoint connected)
        self.requester = requester
        self.clock = clock
        self.rng = rng or random.Random()
        self.repair_slice = repair_slice
        self.membership = Membership(clock, cfg.heartbeat_interval, cfg.suspect_threshold, cfg.dead_threshold)
        for node in cfg.providers():
            if node.name != requester:
                self.membership.add(node.name, failure_domain=node.failure_domain, capacity=node.capacity)
        rate = cfg.requester.repatriate_rate
        self.bucket = TokenBucket(rate, max(rate, store.batch), clock=clock, initial=0) if rate > 0 else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_reconnect: dict[str, float] = {}
        self.counters = {"rounds": 0, "reconnects": 0, "repatriated": 0, "repair_bytes": 0}
        store.set_placement(self.place)

    # -- placement: power of two choices over live, non-draining providers ---------------

    def place(self, candidates, n, chosen):
        by_name = {lk.name: lk for lk in candidates}
        cands = []
        for cand in self.membership.candidates():
            if cand.name in by_name:
                cands.append(cand)
        known = {c.name for c in cands}
        for lk in candidates:  # linked but not heartbeated yet: offer with what the config says
            if lk.name not in known and self.membership.state(lk.name) != DEAD:
                cands.append(Candidate(lk.name, free=1 << 62, failure_domain=lk.failure_domain))
        if not cands:
            return []
        try:
            placement = choose_targets(cands, min(n, len(cands)), rng=self.rng, need_bytes=self.store.slab_bytes(),
                                       existing=[lk.name for lk in chosen], allow_degraded=True)
        except errors.StoreFullError:
            return []
        return [by_name[name] for name in placement.targets]

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> Keeper:
        self._thread = threading.Thread(target=self._run, name="rram-keeper", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self.clock()
            try:
                busy = self.step()
            except errors.RramError as exc:
                if self._stop.is_set():
                    break
                log.warning("keeper round failed: %s", exc)
                busy = False
            except Exception:  # a bug must not silently end failure handling
                log.exception("keeper round crashed")
                busy = False
            if not busy:
                self._stop.wait(max(0.0, self.cfg.heartbeat_interval - (self.clock() - started)))

    def step(self) -> bool:
        """One round; True when repair or repatriation still has work (run again soon)."""
        self.counters["rounds"] += 1
        self._heartbeats()
        for event in self.membership.tick():
            self._on_event(event)
        self._reconnect()
        busy = False
        copied = self.store.repair(self.repair_slice)
        self.counters["repair_bytes"] += copied
        busy |= copied > 0
        if self.bucket is not None and self.store.wants_repatriation():
            n = self.bucket.take_up_to(self.store.batch)
            if n:
                moved = self.store.repatriate(n)
                self.counters["repatriated"] += moved
        return busy

    def _heartbeats(self) -> None:
        remote = self.store.remote
        for link in [lk for lk in remote.links if lk.alive]:
            try:
                reply = link.client.heartbeat()
                info = NodeInfo.from_heartbeat(reply, link.failure_domain)
            except (errors.ConnectionLost, ConnectionError) as exc:
                self.store.provider_failed(link.index, f"control connection lost: {exc}")
                continue
            except (errors.RramError, OSError) as exc:
                log.debug("heartbeat to %s failed: %s", link.name, exc)  # suspect, then dead by timing
                continue
            if link.incarnation is None:
                link.incarnation = info.incarnation
            elif info.incarnation != link.incarnation:
                # restarted behind our back: the memory behind our leases is gone
                self.store.provider_failed(link.index, "provider restarted")
                continue
            for event in self.membership.join(link.name, info):
                self._on_event(event)

    def _on_event(self, event) -> None:
        log.info("membership: %s %s (epoch %d)", event.kind, event.name, event.epoch)
        links = [lk for lk in self.store.remote.links if lk.name == event.name and lk.alive]
        if event.kind == "dead":
            for lk in links:
                self.store.provider_failed(lk.index, "no heartbeat for the dead threshold")
        elif event.kind == "draining":
            for lk in links:
                if not lk.draining:
                    self.store.drain(event.name)

    def _reconnect(self) -> None:
        """Link providers we are not (or no longer) connected to, at most every dead_threshold."""
        now = self.clock()
        linked = {lk.name for lk in self.store.remote.links if lk.alive}
        for node in self.cfg.providers():
            if node.name == self.requester or node.name in linked:
                continue
            if self._next_reconnect.get(node.name, 0) > now:
                continue
            self._next_reconnect[node.name] = now + self.cfg.heartbeat_interval * 2
            try:
                link = self._connect(node)
            except (errors.RramError, OSError) as exc:
                log.debug("provider %s still unreachable: %s", node.name, exc)
                continue
            self.store.add_provider(link)
            self.counters["reconnects"] += 1
            log.info("provider %s linked", node.name)
