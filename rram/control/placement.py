"""Where replicas go: pure functions over candidate snapshots, a seeded RNG, no I/O.

Rules, in order of importance:

1. Never two replicas of a slab on one node; never a node in ``exclude`` (the requester itself
   in the symmetric topology, the draining node, dead nodes, nodes that already hold a copy).
2. Never a node without ``need_bytes`` free.
3. Replicas in distinct failure domains while the usable candidates span enough domains; a
   node without a ``failure_domain`` label is its own domain.  When there are too few domains
   the remaining replicas go to distinct nodes and the result says ``domains_spread=False``.
4. Among the nodes left, "power of two choices" (Infiniswap): sample two at random and take the
   better one, ``free / (1 + load)``: cheap, needs no global sort, and spreads load without
   herding every requester onto the single emptiest node.

Too few usable nodes: ``choose_targets`` raises StoreFullError, or with ``allow_degraded=True``
returns what it could (at least one node) with ``degraded=True``; the store then runs the slab
with fewer copies and re-replicates when providers join.  The store asks for one slab at a time
(through ``Keeper.place``) when it places, re-replicates or drains a slab.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import StoreFullError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A provider as placement sees it: a snapshot, never updated in place."""

    name: str
    free: int
    load: float = 0.0
    failure_domain: str | None = None
    capacity: int = 0

    @property
    def domain(self) -> str:
        return self.failure_domain if self.failure_domain else f"node:{self.name}"

    @property
    def score(self) -> float:
        """Higher is better: more free bytes, less load (load is a load average, >= 0)."""
        return self.free / (1.0 + max(self.load, 0.0))


@dataclass(frozen=True)
class Placement:
    """The chosen nodes, best first; iterate it like the list of names it holds."""

    targets: tuple[str, ...]
    wanted: int
    domains_spread: bool = True

    @property
    def degraded(self) -> bool:
        return len(self.targets) < self.wanted

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.targets[i]


def choose_targets(candidates: Iterable[Candidate], r: int, *, rng: random.Random, exclude: Iterable[str] = (),
                   need_bytes: int = 0, existing: Iterable[str] = (), allow_degraded: bool = False) -> Placement:
    """``r`` distinct nodes for new replicas of one slab.

    ``existing`` names nodes that already hold a copy: they are excluded and their failure
    domains count as taken, so the new copies spread away from them.
    """
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    if need_bytes < 0:
        raise ValueError(f"need_bytes must be >= 0, got {need_bytes}")
    cands = _by_name(candidates)
    exclude, existing = _names(exclude), _names(existing)
    taken_domains = {cands[n].domain for n in existing if n in cands}
    usable = [c for c in cands.values() if c.name not in existing and c.name not in exclude
              and c.free >= need_bytes]
    picks, spread = _pick(usable, r, taken_domains, rng)
    if len(picks) < r and not (allow_degraded and picks):
        raise StoreFullError(
            f"need {r} distinct providers with {need_bytes} bytes free, found {len(usable)}"
            f" (of {len(cands)} candidates)")
    if not spread:
        log.warning("placing %d replicas on %s: too few failure domains to keep them apart", r, list(picks))
    return Placement(tuple(picks), r, spread)


# -- internals -----------------------------------------------------------------------------


def _by_name(candidates: Iterable[Candidate]) -> dict[str, Candidate]:
    out: dict[str, Candidate] = {}
    for c in candidates:
        if c.name in out:
            raise ValueError(f"candidate {c.name!r} is listed twice")
        out[c.name] = c
    return out


def _names(names: Iterable[str]) -> set[str]:
    if isinstance(names, str):  # exclude="mem1" would otherwise exclude the letters m, e, 1
        return {names}
    return set(names)


def _pick(usable: list[Candidate], n: int, taken_domains: set[str], rng: random.Random) -> tuple[list[str], bool]:
    """Up to ``n`` distinct names by power of two choices, new failure domains first."""
    picks: list[str] = []
    spread = True
    left = list(usable)
    domains = set(taken_domains)
    while len(picks) < n and left:
        fresh = [c for c in left if c.domain not in domains]
        if not fresh:
            spread = False
            fresh = left
        best = _two_choices(fresh, rng)
        picks.append(best.name)
        domains.add(best.domain)
        left = [c for c in left if c.name != best.name]
    return picks, spread


def _two_choices(pool: list[Candidate], rng: random.Random) -> Candidate:
    if len(pool) == 1:
        return pool[0]
    a, b = rng.sample(pool, 2)
    return a if (a.score, b.name) >= (b.score, a.name) else b
