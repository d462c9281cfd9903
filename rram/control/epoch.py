"""Handles that remember the membership epoch they were made in, and fail loudly when stale.

The model is asyncpg's generation counter: a resource records the generation of its connection
when it is created, and every use compares that number with the current one.  One integer
comparison per use, no registry of live handles, no callbacks to clear on change.

rram stamps a remote slab handle (lease, rkey, address) with the *node epoch* of the provider
it lives on: the membership epoch at which that provider's current incarnation entered the live
set (``Membership.node_epoch(name)``).  The handle stays valid while that provider stays in the
live set as the same incarnation, and becomes stale the moment it dies, leaves, restarts or
rejoins after a partition, whatever happens to other nodes::

    h = EpochHandle(region, membership.node_epoch("mem1"), node="mem1")
    region = h.check(membership.node_epoch("mem1"))      # StaleHandleError after mem1 restarts

For many handles at once (the store keeps one epoch per slab replica in a numpy array),
``check_many`` compares whole arrays.
"""
from __future__ import annotations

from typing import Generic, TypeVar

import numpy as np

from ..errors import StaleHandleError

T = TypeVar("T")

#: the node epoch of a node that is not in the live set; no handle is ever stamped with it
NOT_LIVE = -1


class EpochHandle(Generic[T]):
    """``value`` as of membership epoch ``epoch``; ``check(current)`` returns it or raises."""

    __slots__ = ("value", "epoch", "node")

    def __init__(self, value: T, epoch: int, node: str | None = None):
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"a handle epoch is an int >= 0, got {epoch!r}")
        self.value = value
        self.epoch = epoch
        self.node = node

    def valid(self, current_epoch: int) -> bool:
        return self.epoch == current_epoch

    def check(self, current_epoch: int) -> T:
        """The value, or StaleHandleError when the epoch moved on since the handle was made."""
        if self.epoch != current_epoch:
            raise _stale(self.epoch, current_epoch, self.node)
        return self.value

    def __repr__(self) -> str:
        where = f" on {self.node}" if self.node else ""
        return f"EpochHandle({self.value!r}, epoch={self.epoch}{where})"


class EpochCounter:
    """A monotonic epoch for things that are not per node (e.g. a requester's whole slab table)."""

    __slots__ = ("current",)

    def __init__(self, start: int = 0):
        self.current = start

    def advance(self) -> int:
        self.current += 1
        return self.current

    def stamp(self, value: T, node: str | None = None) -> EpochHandle[T]:
        return EpochHandle(value, self.current, node)

    def check(self, handle: EpochHandle[T]) -> T:
        return handle.check(self.current)


def check_many(handle_epochs, current_epochs, what: str = "handle") -> None:
    """Raise StaleHandleError for the first position where the two epoch arrays differ.

    ``current_epochs`` may be a scalar or an array of the same shape (e.g. the node epoch of
    the provider of each replica, gathered with one numpy index).
    """
    handle_epochs = np.asarray(handle_epochs)
    current = np.broadcast_to(np.asarray(current_epochs), handle_epochs.shape)
    stale = np.flatnonzero(handle_epochs != current)
    if stale.size:
        i = int(stale[0])
        h, c = int(handle_epochs.flat[i]), int(current.flat[i])
        raise StaleHandleError(f"{what} #{i} ({stale.size} stale in all) is from epoch {h}, current is {c}", h, c)


def _stale(handle_epoch: int, current_epoch: int, node: str | None) -> StaleHandleError:
    if current_epoch == NOT_LIVE:
        why = f"node {node} is no longer in the live set" if node else "the node is no longer in the live set"
    else:
        why = f"the current epoch is {current_epoch}" + (f" for node {node}" if node else "")
    return StaleHandleError(f"stale handle from epoch {handle_epoch}: {why}", handle_epoch, current_epoch)
