"""The filter/scorer stack over one snapshot: :class:`Scheduler` and :func:`schedule`.

``Scheduler(snapshot)`` builds the per-snapshot indexes once (:class:`ClusterIndex`) and runs
the host-only filters once. Each ``schedule(request)`` then runs the request filters over the
remaining hosts (``feasible.REQUEST_FILTERS``, skipping those that do not apply), scores the
survivors with every scorer whose weight is above 0 (``rank.SCORERS``) and returns a
:class:`Plan`. ``place`` and ``move`` apply a decision to the indexes, so placing many VMs in a
row (or trying moves in the rebalancer) never rebuilds them. Nothing here does I/O.
"""

from __future__ import annotations

from itertools import compress, islice, repeat
from operator import add, eq, itemgetter, mul

from corral.scheduler.feasible import HOST_FILTERS, REQUEST_FILTERS, Rejected
from corral.scheduler.feasible.base import cut
from corral.scheduler.index import ClusterIndex
from corral.scheduler.plan import Plan
from corral.scheduler.rank import SCORERS
from corral.scheduler.snapshot import Request, Snapshot

__all__ = ["Scheduler", "schedule"]


class Scheduler:
    """Placements against one snapshot, applied incrementally. Not thread-safe."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.index = ClusterIndex(snapshot)
        self._host_rejected: Rejected = {}
        eligible = []
        for i, node in enumerate(snapshot.nodes):
            for check in HOST_FILTERS:
                why = check.check(node)
                if why is not None:
                    self._host_rejected[i] = (check.name, why)
                    break
            else:
                eligible.append(i)
        # Hosts every host-only filter accepted, in snapshot order.
        self.eligible: tuple[int, ...] = tuple(eligible)
        # The host-only rejections by host name, for a plan no request filter adds to.
        names = self.index.names
        self._host_rejections = {names[i]: r for i, r in self._host_rejected.items()}
        # Their names, the plan's ``feasible`` when no request filter rejects a host.
        self._eligible_names: tuple[str, ...] = tuple(names[i] for i in eligible)

    def feasible(self, request: Request) -> tuple[list[int], Rejected]:
        """The hosts that pass every hard rule, and why each other host does not."""
        rejected: Rejected = dict(self._host_rejected)
        hosts = list(self.eligible)
        ix = self.index
        for rule in REQUEST_FILTERS:
            if not hosts:
                break
            if rule.applies(request):
                hosts = rule.run(ix, request, hosts, rejected)
        return hosts, rejected

    def schedule(self, request: Request) -> Plan:
        """Where ``request`` goes now (the indexes are not changed: see :meth:`place`)."""
        hosts, rejected = self.feasible(request)
        names = self.index.names
        policy = request.policy or self.snapshot.policy
        if len(rejected) == len(self._host_rejected):
            rejections = dict(self._host_rejections)
        else:
            rejections = dict(zip(map(names.__getitem__, rejected), rejected.values(), strict=True))
        if not hosts:
            return Plan(request.vm, None, policy=policy, rejections=rejections)
        ix = self.index
        columns: dict[str, list[float]] = {}
        weights: dict[str, float] = {}
        totals: list[float] | None = None
        for scorer in SCORERS:
            w = scorer.weight(ix, request, policy)
            if w <= 0:
                continue
            col = scorer.score(ix, request, hosts)
            columns[scorer.name] = col
            weights[scorer.name] = w
            # w * x per host (and + the total so far), at C speed.
            if totals is None:
                totals = list(map(mul, repeat(w), col)) if w != 1.0 else list(col)
            else:
                totals = list(map(add, totals, map(mul, repeat(w), col)))
        if totals is None:
            totals = [0.0] * len(hosts)
        top = max(totals)
        first = totals.index(top)
        # Ties go to the name first in sort order, so plans do not depend on snapshot order.
        if top not in totals[first + 1 :]:
            best = names[hosts[first]]
        else:
            best = min(map(names.__getitem__, compress(hosts, map(eq, totals, repeat(top)))))
        return Plan(
            request.vm,
            best,
            top,
            policy,
            rejections,
            self._names_of(hosts, rejected),
            columns,
            totals,
            weights,
        )

    def _names_of(self, hosts: list[int], rejected: Rejected) -> tuple[str, ...]:
        """The names of ``hosts``, which the request filters took from ``eligible`` (each
        recording the hosts it dropped in ``rejected``, after the host-only rejections)."""
        dropped = len(self.eligible) - len(hosts)
        if dropped == 0:
            return self._eligible_names
        if dropped <= 16:
            gone = sorted(islice(rejected, len(self._host_rejected), None))
            if len(gone) == dropped:
                # Cut the few dropped hosts out of the eligible hosts' names.
                return tuple(cut(self.eligible, self._eligible_names, gone))
        names = self.index.names
        return tuple(names[i] for i in hosts) if len(hosts) < 2 else itemgetter(*hosts)(names)

    def place(self, request: Request, node: str) -> None:
        """Record that ``request``'s VM now runs on ``node`` (it takes its resources there)."""
        self.index.place(request, self.index.pos[node])

    def move(self, vm: str, node: str) -> None:
        """Record that the listed VM ``vm`` live-migrated to ``node``."""
        self.index.move(vm, self.index.pos[node])


def schedule(snapshot: Snapshot, request: Request) -> Plan:
    """Where ``request`` goes in ``snapshot``: a :class:`Plan`, never an exception for a VM that
    fits nowhere (then ``plan.node`` is None and every host says why)."""
    return Scheduler(snapshot).schedule(request)
