"""The filter/scorer stack over one snapshot: :class:`Scheduler` and :func:`schedule`.

``Scheduler(snapshot)`` builds the per-snapshot indexes once (:class:`ClusterIndex`) and runs
the host-only filters once. Each ``schedule(request)`` then runs the request filters over the
remaining hosts (``feasible.REQUEST_FILTERS``, skipping those that do not apply), scores the
survivors with every scorer whose weight is above 0 (``rank.SCORERS``) and returns a
:class:`Plan`. ``place`` and ``move`` apply a decision to the indexes, so placing many VMs in a
row (or trying moves in the rebalancer) never rebuilds them. Nothing here does I/O.
"""

from __future__ import annotations

from operator import itemgetter

from corral.scheduler.feasible import HOST_FILTERS, REQUEST_FILTERS, Rejected
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
        rejections = {names[i]: r for i, r in rejected.items()}
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
            if totals is None:
                totals = [w * x for x in col] if w != 1.0 else list(col)
            else:
                totals = [t + w * x for t, x in zip(totals, col, strict=True)]
        if totals is None:
            totals = [0.0] * len(hosts)
        top = max(totals)
        # Ties go to the name first in sort order, so plans do not depend on snapshot order.
        if totals.count(top) == 1:
            best = names[hosts[totals.index(top)]]
        else:
            best = min(names[hosts[k]] for k, t in enumerate(totals) if t == top)
        return Plan(
            request.vm,
            best,
            top,
            policy,
            rejections,
            tuple(names[i] for i in hosts) if len(hosts) < 2 else itemgetter(*hosts)(names),
            columns,
            totals,
            weights,
        )

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
