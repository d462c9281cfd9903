"""The requester's control loop: membership from heartbeats, failures, resume, repair, repatriation.

A *prober* thread per provider does every blocking exchange with that provider and nothing
else, so one slow or hung node never holds up the others (RAMster and our first keeper
heartbeated nodes one after another and waited ~5 s on each reconnect to a hung one):

* a linked provider gets a heartbeat every ``heartbeat_interval``, bounded by the control
  timeout (``requester.heartbeat_timeout``, at most ``suspect_threshold``);
* a suspended link (the data path timed out or broke) or a dropped control connection is
  *resumed*: the same session and leases (``resume``, inside the provider's lease_grace),
  the data endpoint recovered; a provider that refuses the connection or no longer has the
  session is dead at once (the kernel, or the provider, already told us);
* an unlinked provider is linked (a new session), at most every two heartbeat intervals.

A heartbeat reply may ask for memory back (``rram reclaim``): the store drops ephemeral pages
there first, then moves slabs off it as in a drain.

Probers only post what they found; the keeper thread applies it in order:

1. heartbeats feed ``Membership``: silent for ``suspect_threshold`` -> suspect (no new slabs
   there), for ``dead_threshold`` -> dead: its slabs are degraded and re-replicated;
2. a resumed provider is used again; only the copies that missed writes while it was
   suspended are copied again (nothing is re-replicated after a blip);
3. ``store.repair()`` for a bounded slice (re-replication, resync, drain copying), which only
   ever talks to live providers;
4. remote pages come home at ``repatriate_rate`` pages/s while the local pool has room
   (RAMster's "frontswap selfshrinking").

Policy lives here; the store only exposes mechanisms (provider_failed, resume_provider, drain,
repair, repatriate).
"""
from __future__ import annotations

import errno
import logging
import queue
import random
import threading
import time
from collections.abc import Callable

from .. import errors
from .membership import KNOWN, Membership, NodeInfo
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
        #: one control request's deadline: a reply later than the suspect threshold is no use
        self.call_timeout = control_timeout(cfg)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probers: list[threading.Thread] = []
        self._found: queue.SimpleQueue = queue.SimpleQueue()  # (kind, link, detail) from the probers
        self._wake = threading.Event()  # set with every finding: the keeper acts on it at once
        self.counters = {"rounds": 0, "reconnects": 0, "resumes": 0, "repatriated": 0, "repair_bytes": 0}
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
            if lk.name not in known and self.membership.state(lk.name) == KNOWN:  # (not a suspect one)
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
        for node in self.cfg.providers():
            if node.name != self.requester:
                t = threading.Thread(target=self._probe, args=(node,), name=f"rram-probe-{node.name}", daemon=True)
                t.start()
                self._probers.append(t)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop every thread; waits at most one control timeout (a prober may be in a call to a
        hung provider: it is a daemon thread and ends at its socket's timeout)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + (self.call_timeout if timeout is None else timeout)
        for t in [self._thread, *self._probers]:
            if t is not None and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self._close_unapplied()

    def _close_unapplied(self) -> None:
        """Hang up the links a prober made that the keeper never added to the store (it stopped
        first): nothing else holds them, so their sockets would stay open until collected."""
        for kind, link, _detail in self._findings():
            if kind == "linked":
                self._close_link(link)

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
            if not busy:  # sleep until the next round, or until a prober finds something
                self._wake.wait(max(0.0, self.cfg.heartbeat_interval - (self.clock() - started)))
            self._wake.clear()

    def step(self) -> bool:
        """One round; True when repair or repatriation still has work (run again soon)."""
        self.counters["rounds"] += 1
        self._apply_found()
        for event in self.membership.tick():
            self._on_event(event)
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

    # -- applying what the probers found (keeper thread only) ---------------------------------

    def _findings(self):
        """What the probers queued, (kind, link, detail), until the queue is empty."""
        while True:
            try:
                yield self._found.get_nowait()
            except queue.Empty:
                return

    def _apply_found(self) -> None:
        for kind, link, detail in self._findings():
            if kind == "linked":
                if self._stop.is_set():
                    self._close_link(link)
                    continue
                self.store.add_provider(link)
                self.counters["reconnects"] += 1
                log.info("provider %s linked", link.name)
            elif kind == "lost":
                self.store.provider_failed(link.index, detail)
            elif kind == "resumed":
                if link.suspended and link.incarnation in (None, detail.incarnation):
                    self.store.resume_provider(link.index)
                    self.counters["resumes"] += 1
                self._beat(link, detail)  # a restart behind our back: dead here
            elif kind == "beat":
                self._beat(link, detail)
            elif kind == "reclaim" and link.alive:
                self.store.reclaim(link.index, detail)

    def _beat(self, link, info: NodeInfo) -> None:
        if not (link.alive or link.suspended):
            return  # declared dead while the heartbeat was on its way
        if link.incarnation is None:
            link.incarnation = info.incarnation
        elif info.incarnation != link.incarnation:
            # restarted behind our back: the memory behind our leases is gone
            self.store.provider_failed(link.index, "provider restarted")
            return
        for event in self.membership.join(link.name, info):
            self._on_event(event)

    def _on_event(self, event) -> None:
        log.info("membership: %s %s (epoch %d)", event.kind, event.name, event.epoch)
        links = [lk for lk in self.store.remote.links if lk.name == event.name and (lk.alive or lk.suspended)]
        if event.kind == "dead":
            for lk in links:
                self.store.provider_failed(lk.index, "no heartbeat for the dead threshold")
        elif event.kind == "draining":
            for lk in links:
                if not lk.draining:
                    self.store.drain(event.name)

    # -- probers: all blocking I/O with one provider, in that provider's own thread -----------

    def _post(self, finding: tuple) -> None:
        self._found.put(finding)
        self._wake.set()

    def _link_of(self, name: str):
        """The link in use (alive or suspended) for provider ``name``, or None."""
        for lk in reversed(list(self.store.remote.links)):  # appended only: a snapshot is safe
            if lk.name == name and (lk.alive or lk.suspended):
                return lk
        return None

    def _probe(self, node) -> None:
        next_link = 0.0
        while not self._stop.is_set():
            started = self.clock()
            link = self._link_of(node.name)
            try:
                if link is None:
                    if started >= next_link:
                        next_link = started + 2 * self.cfg.heartbeat_interval
                        self._try_link(node)
                elif link.suspended or not link.client.connected:
                    self._try_resume(link)
                else:
                    self._heartbeat(link)
                    if link.unfreed:
                        self._free_unfreed(link)
            except Exception:  # a bug must not silently end this provider's failure handling
                log.exception("prober of %s crashed a round", node.name)
            self._stop.wait(max(0.0, self.cfg.heartbeat_interval - (self.clock() - started)))

    def _heartbeat(self, link) -> None:
        try:
            reply = link.client.heartbeat(timeout=self.call_timeout)
            self._post(("beat", link, NodeInfo.from_heartbeat(reply, link.failure_domain)))
            if reply["reclaim"] > 0:  # its host wants memory back: our share, in bytes
                self._post(("reclaim", link, reply["reclaim"]))
            degraded = len(self.store.remote.degraded)
            if degraded != link.reported_degraded:  # for `rram status`, only when it changes
                link.client.report(degraded)
                link.reported_degraded = degraded
        except errors.ConnectionLost as exc:
            if _timed_out(exc):  # silent: suspect, then dead by timing; resumed when it answers
                log.debug("heartbeat to %s: %s", link.name, exc)
            else:  # reset or closed: resume now (a dead process refuses: dead at once)
                self._try_resume(link)
        except (errors.RramError, OSError) as exc:
            log.debug("heartbeat to %s failed: %s", link.name, exc)

    def _try_resume(self, link) -> None:
        """Back to the same session and leases; dead when the provider refuses or forgot them."""
        client = link.client
        try:
            if client.connected:
                reply = client.heartbeat(timeout=self.call_timeout)
            else:
                client.resume()
                reply = client.heartbeat(timeout=self.call_timeout)
            if link.suspended:
                link.endpoint.recover()  # drops whatever was in flight when it was suspended
        except errors.NotFound as exc:
            self._post(("lost", link, f"resume refused: {exc}"))
            return
        except (errors.RramError, OSError) as exc:
            if _refused(exc):
                self._post(("lost", link, f"connection refused: {exc}"))
            else:
                log.debug("provider %s not back yet: %s", link.name, exc)
            return
        self._post(("resumed", link, NodeInfo.from_heartbeat(reply, link.failure_domain)))

    def _try_link(self, node) -> None:
        try:
            link = self._connect(node)
        except (errors.RramError, OSError) as exc:
            log.debug("provider %s still unreachable: %s", node.name, exc)
            return
        if self._stop.is_set():  # stop() may have drained the findings already
            self._close_link(link)
            return
        self._post(("linked", link, None))

    def _free_unfreed(self, link) -> None:
        while link.unfreed and link.alive:
            lease = link.unfreed.pop()
            try:
                link.client.free_slab(lease)
            except errors.RramError as exc:
                log.debug("freeing lease %s on %s: %s", lease, link.name, exc)

    @staticmethod
    def _close_link(link) -> None:
        for closer in (link.endpoint.close, link.client.close):
            try:
                closer()
            except (errors.RramError, OSError):
                pass


def control_timeout(cfg) -> float:
    """How long a requester waits for one control reply: ``requester.heartbeat_timeout``, but
    never past the suspect threshold (a later answer would come from a suspect node anyway)."""
    return min(cfg.requester.heartbeat_timeout, cfg.suspect_threshold)


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc.__cause__, TimeoutError)


def _refused(exc: BaseException) -> bool:
    """The peer's kernel said nobody listens (or reset us at connect): the process is gone."""
    cause = exc.__cause__
    return isinstance(cause, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED
