"""The two shapes of a filter.

A :class:`HostFilter` looks only at the host (its state, roles, flags): the stack runs it once
per snapshot. A :class:`RequestFilter` looks at the request too and runs per placement, over a
list of candidate hosts (in snapshot order, i.e. ascending index, as the stack passes them),
returning those that pass in the same order and recording every other one in
``rejected`` as ``(filter name, sentence)``. Each filter module owns its ``NAME`` (the short id a
``vm why`` table shows in its "filter" column) and its ``REASON_*`` constants (the start of the
sentence, stable enough to match on).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from itertools import filterfalse
from typing import Protocol, TypeVar

from corral.scheduler.index import ClusterIndex, Room
from corral.scheduler.snapshot import NodeView, Request

__all__ = ["HostFilter", "Rejected", "RequestFilter", "cut", "short_of_room", "without"]

# host index -> (filter name, human sentence)
Rejected = dict[int, tuple[str, str]]
T = TypeVar("T")


def cut(keys: Sequence[int], values: Sequence[T], drop: Iterable[int]) -> list[T]:
    """``values`` (one per key of ``keys``, ascending) less those whose key is in ``drop``
    (ascending, a part of ``keys``): cut out by bisection and slicing rather than by looking
    at every key."""
    out: list[T] = []
    start = 0
    for i in drop:
        k = bisect_left(keys, i, start)
        out += values[start:k]
        start = k + 1
    out += values[start:]
    return out


def without(hosts: list[int], drop: list[int]) -> list[int]:
    """``hosts`` less ``drop`` (both ascending, ``drop`` a part of ``hosts``)."""
    if len(drop) > 16:
        gone = set(drop)
        return list(filterfalse(gone.__contains__, hosts))
    return cut(hosts, hosts, drop)


def short_of_room(
    room: Room,
    hosts: list[int],
    need: int,
    rejected: Rejected,
    name: str,
    reason: Callable[[int], str],
) -> list[int]:
    """The hosts of ``hosts`` with ``need`` free in ``room``; each other one goes into
    ``rejected`` as ``(name, reason(its free room))``. Most often no candidate is short of
    room: then this looks at no host at all."""
    short = room.lacking(hosts, need)
    if not short:
        return hosts
    for i in short:
        rejected[i] = (name, reason(max(room.free[i], 0)))
    return without(hosts, short)


class HostFilter(Protocol):
    name: str

    def check(self, node: NodeView) -> str | None:
        """None when the host may take VMs at all, else why not."""


class RequestFilter(Protocol):
    name: str

    def applies(self, request: Request) -> bool:
        """False when the rule has nothing to say about this request (it is then skipped)."""

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        """The hosts of ``hosts`` (ascending) that pass, in order; the others go into
        ``rejected``."""
