"""Cluster membership from heartbeats: who is alive, who is suspect, who is gone.  Sans-IO.

RAMster's cluster is a hand-written node list brought up by ``manual_node_up`` on every node
"approximately concurrently".  Here a node from the cluster file is *known* and becomes alive
at its first heartbeat; other nodes ``join`` at run time.  Nothing reads a clock but the
injected ``clock``, nothing sends or sleeps: the driver (rram/control/keeper.py) feeds
heartbeats in, calls ``tick()`` once a round and acts on the returned events.

States and events::

    known --heartbeat/join--> alive                 joined
    alive --no heartbeat for suspect_after--> suspect   suspect   (still live: handles stay valid)
    suspect --heartbeat--> alive                    alive_again
    alive/suspect --no heartbeat for dead_after--> dead   dead
    dead --heartbeat, higher incarnation--> alive   restarted
    dead --heartbeat, same incarnation--> alive     rejoined  (a healed partition, see below)
    alive/suspect --heartbeat, higher incarnation--> alive   restarted (it restarted faster than dead_after)
    alive/suspect: draining flag set                draining  (live, but no longer a placement candidate)

Thresholds are inclusive: exactly ``suspect_after`` seconds after the last heartbeat the node
is suspect, exactly ``dead_after`` seconds after it is dead.

The *live set* is the set of (name, incarnation) of alive and suspect nodes.  ``epoch``, the
membership epoch (the only thing rram calls an epoch in the control plane), counts its changes:
every joined, dead, restarted and rejoined event adds one (each event carries the epoch after
it); suspect, alive_again, draining and heartbeats do not change it.  ``node_epoch(name)`` is
the epoch at which the node's current incarnation entered the live set (NOT_LIVE when it is
not live).  A provider's *incarnation* is its restart marker (``ProviderClient.incarnation``,
the start time it announces); it is not an epoch.

Partition heals: a dead node that heartbeats again with the *same* incarnation is readmitted
("rejoined") as a new member of the live set, with a new node epoch.  Its slabs were already
re-replicated when it was declared dead, so every handle from before is stale and the requester
must treat it as an empty provider (free or resume its old leases).  Refusing it until a restart
would strand healthy memory forever after a network blip.

Heartbeats with an older incarnation than the one known (a delayed packet from a previous
process) are ignored and counted.  The requester's pages do not carry epochs: a remote replica
is reached through its provider's link, and the store drops the link's replicas when the keeper
reports the provider dead or restarted.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from ..errors import ConfigError, NotFound, ProtocolError
from .placement import Candidate

log = logging.getLogger(__name__)

KNOWN, ALIVE, SUSPECT, DEAD = "known", "alive", "suspect", "dead"
LIVE_STATES = (ALIVE, SUSPECT)
EVENT_KINDS = ("joined", "suspect", "alive_again", "dead", "restarted", "rejoined", "draining")
#: events that change the live set, hence the epoch
EPOCH_EVENTS = frozenset({"joined", "dead", "restarted", "rejoined"})
#: the node epoch of a node that is not in the live set
NOT_LIVE = -1


@dataclass(frozen=True)
class NodeInfo:
    """What a heartbeat says about a node."""

    capacity: int = 0
    free: int = 0
    load: float = 0.0
    failure_domain: str | None = None
    incarnation: int = 0
    draining: bool = False

    def __post_init__(self):
        for key in ("capacity", "free", "incarnation"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ProtocolError(f"node info: {key} must be an int >= 0, got {v!r}")
        if isinstance(self.load, bool) or not isinstance(self.load, (int, float)) or not math.isfinite(self.load) \
                or self.load < 0:
            raise ProtocolError(f"node info: load must be a finite number >= 0, got {self.load!r}")
        if self.failure_domain is not None and not isinstance(self.failure_domain, str):
            raise ProtocolError(f"node info: failure_domain must be a string or None, got {self.failure_domain!r}")

    @classmethod
    def from_heartbeat(cls, reply: Mapping, failure_domain: str | None = None) -> NodeInfo:
        """From a provider's ``heartbeat`` reply (``incarnation``: the provider's start time)."""
        try:
            return cls(capacity=reply["capacity"], free=reply["free"], load=reply["load"],
                       failure_domain=failure_domain, incarnation=reply["incarnation"],
                       draining=reply.get("state", "serving") != "serving")
        except KeyError as exc:
            raise ProtocolError(f"heartbeat reply lacks {exc.args[0]!r}: {dict(reply)!r}") from None


@dataclass
class Member:
    name: str
    state: str = KNOWN
    info: NodeInfo = NodeInfo()
    roles: tuple[str, ...] = ("provider",)
    last_heartbeat: float | None = None
    state_since: float | None = None
    node_epoch: int = NOT_LIVE


@dataclass(frozen=True)
class Event:
    kind: str
    name: str
    epoch: int  # the membership epoch after this event
    at: float
    incarnation: int


class Membership:
    """The requester's (or any node's) view of the cluster; see the module docstring."""

    def __init__(self, clock: Callable[[], float], heartbeat_interval: float, suspect_after: float,
                 dead_after: float):
        if not 0 < heartbeat_interval <= suspect_after < dead_after:
            raise ConfigError("membership timing: need 0 < heartbeat_interval <= suspect_after < dead_after, got "
                              f"{heartbeat_interval}, {suspect_after}, {dead_after}")
        self._clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.epoch = 0
        self._members: dict[str, Member] = {}
        self.counters = {"heartbeats": 0, "stale_heartbeats": 0}

    # -- input ---------------------------------------------------------------------------

    def add(self, name: str, *, failure_domain: str | None = None, capacity: int = 0,
            roles: Iterable[str] = ("provider",)) -> None:
        """A node from the cluster file: known, not live until it heartbeats."""
        if name in self._members:
            raise ConfigError(f"node {name!r} is listed twice")
        self._members[name] = Member(name, info=NodeInfo(capacity=capacity, failure_domain=failure_domain),
                                     roles=tuple(roles))

    def join(self, name: str, info: NodeInfo, *, roles: Iterable[str] | None = None) -> list[Event]:
        """A node announces itself (known or new); for a live node this is just a heartbeat."""
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"a node name is a non-empty string, got {name!r}")
        if name not in self._members:
            self._members[name] = Member(name, roles=tuple(roles) if roles is not None else ("provider",))
        elif roles is not None:
            self._members[name].roles = tuple(roles)
        return self._beat(self._members[name], info)

    def heartbeat(self, name: str, info: NodeInfo) -> list[Event]:
        return self._beat(self._get(name), info)

    def _beat(self, m: Member, info: NodeInfo) -> list[Event]:
        name = m.name
        now = self._clock()
        self.counters["heartbeats"] += 1
        if info.failure_domain is None and m.info.failure_domain is not None:
            info = replace(info, failure_domain=m.info.failure_domain)  # the cluster file's label stays
        known_inc = m.info.incarnation
        if m.state != KNOWN and info.incarnation < known_inc:
            self.counters["stale_heartbeats"] += 1
            log.debug("ignoring heartbeat of %s incarnation %d (current %d)", name, info.incarnation, known_inc)
            return []
        was_draining = m.info.draining
        m.info = info
        m.last_heartbeat = now
        events: list[Event] = []
        if m.state == KNOWN:
            events.append(self._enter_live(m, "joined", now))
        elif m.state == DEAD:
            events.append(self._enter_live(m, "restarted" if info.incarnation > known_inc else "rejoined", now))
        elif info.incarnation > known_inc:  # restarted before we noticed it was gone
            events.append(self._enter_live(m, "restarted", now))
        elif m.state == SUSPECT:
            m.state, m.state_since = ALIVE, now
            events.append(self._event("alive_again", m, now))
        entered_live = any(e.kind in EPOCH_EVENTS for e in events)
        if info.draining and (entered_live or not was_draining):
            events.append(self._event("draining", m, now))
        return events

    def tick(self) -> list[Event]:
        """Advance alive -> suspect -> dead by the time since each node's last heartbeat."""
        now = self._clock()
        events: list[Event] = []
        for m in self._members.values():
            if m.state not in LIVE_STATES:
                continue
            silent = now - m.last_heartbeat
            if silent >= self.dead_after:
                m.state, m.state_since, m.node_epoch = DEAD, now, NOT_LIVE
                self.epoch += 1
                events.append(self._event("dead", m, now))
                log.warning("node %s is dead: no heartbeat for %.3f s", m.name, silent)
            elif silent >= self.suspect_after and m.state == ALIVE:
                m.state, m.state_since = SUSPECT, now
                events.append(self._event("suspect", m, now))
        return events

    # -- output --------------------------------------------------------------------------

    def state(self, name: str) -> str:
        return self._get(name).state

    def info(self, name: str) -> NodeInfo:
        return self._get(name).info

    def node_epoch(self, name: str) -> int:
        """The epoch at which ``name``'s current incarnation became live; NOT_LIVE if it is not."""
        m = self._members.get(name)
        return NOT_LIVE if m is None else m.node_epoch

    def live(self) -> list[str]:
        """Alive and suspect nodes, sorted by name."""
        return sorted(n for n, m in self._members.items() if m.state in LIVE_STATES)

    def candidates(self, *, exclude: Iterable[str] = (), role: str = "provider") -> list[Candidate]:
        """Placement candidates: alive (not suspect), not draining, with ``role``, not excluded."""
        exclude = {exclude} if isinstance(exclude, str) else set(exclude)
        return [Candidate(m.name, m.info.free, m.info.load, m.info.failure_domain, m.info.capacity)
                for m in sorted(self._members.values(), key=lambda m: m.name)
                if m.state == ALIVE and not m.info.draining and role in m.roles and m.name not in exclude]

    def __contains__(self, name: str) -> bool:
        return name in self._members

    def __len__(self) -> int:
        return len(self._members)

    # -- internals -----------------------------------------------------------------------

    def _get(self, name: str) -> Member:
        try:
            return self._members[name]
        except KeyError:
            raise NotFound(f"node {name!r} is not a member (join it first)") from None

    def _enter_live(self, m: Member, kind: str, now: float) -> Event:
        self.epoch += 1
        m.state, m.state_since, m.node_epoch = ALIVE, now, self.epoch
        log.info("node %s %s (incarnation %d, epoch %d)", m.name, kind, m.info.incarnation, self.epoch)
        return self._event(kind, m, now)

    def _event(self, kind: str, m: Member, now: float) -> Event:
        return Event(kind, m.name, self.epoch, now, m.info.incarnation)
