"""VM priority: a VM with ``priority`` > 0 prefers hosts carrying few VMs of the same or
higher priority, so one host failure takes down as few important VMs as possible.
Score = 1 / (1 + such VMs on the host); weight ``WEIGHT``. Priority 0 (the default) skips it."""

from __future__ import annotations

from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Policy, Request

__all__ = ["NAME", "WEIGHT", "PriorityScorer"]

NAME = "priority"
WEIGHT = 0.5


class PriorityScorer:
    name = NAME

    def weight(self, ix: ClusterIndex, request: Request, policy: Policy) -> float:
        return WEIGHT if request.priority > 0 else 0.0

    def score(self, ix: ClusterIndex, request: Request, hosts: list[int]) -> list[float]:
        p = request.priority
        own = ix.vm_request.get(request.vm)
        if own is not None and own.priority >= p:
            # The VM is placed already (a migration): it is no peer of itself.
            peers = self._peers(ix, p)
            peers[ix.vm_host[request.vm]] -= 1
            return [1.0 / (1 + peers.get(i, 0)) for i in hosts]

        def one(i: int) -> float:
            n = sum(at.get(i, 0) for prio, at in ix.priority_hosts.items() if prio >= p)
            return 1.0 / (1 + n)

        def every() -> list[float]:
            peers = self._peers(ix, p)
            return [1.0 / (1 + peers.get(i, 0)) for i in range(len(ix.nodes))]

        # The score of every host for this priority, kept up to date between placements.
        col = ix.column((NAME, p), every, one)
        return list(map(col.__getitem__, hosts))

    @staticmethod
    def _peers(ix: ClusterIndex, p: int) -> dict[int, int]:
        """Host index -> VMs of priority ``p`` or higher there (hosts with none are absent)."""
        peers: dict[int, int] = {}
        for prio, at in ix.priority_hosts.items():
            if prio >= p:
                for i, n in at.items():
                    peers[i] = peers.get(i, 0) + n
        return peers
