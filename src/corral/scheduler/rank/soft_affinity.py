"""Soft affinity: a VM of a ``soft-affinity`` group prefers hosts that already hold members
of its group; score = members on the host / members placed, times the group's weight."""

from __future__ import annotations

from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Policy, Request

__all__ = ["NAME", "SoftAffinityScorer"]

NAME = "soft-affinity"


class SoftAffinityScorer:
    name = NAME

    def weight(self, ix: ClusterIndex, request: Request, policy: Policy) -> float:
        if request.group is None:
            return 0.0
        group = ix.groups.get(request.group)
        if group is None or group.policy != NAME:
            return 0.0
        if ix.group_size(group.name, excluding=request.vm) == 0:
            return 0.0
        return group.weight

    def score(self, ix: ClusterIndex, request: Request, hosts: list[int]) -> list[float]:
        assert request.group is not None
        counts = ix.group_counts(request.group, excluding=request.vm)
        total = sum(counts.values()) or 1
        own = ix.vm_request.get(request.vm)
        if own is not None and own.group == request.group:
            # The VM is placed already (a migration): it does not count for itself.
            return [counts.get(i, 0) / total for i in hosts]
        # Members per host (kept up to date between placements), and the score of each count.
        col = ix.group_column(request.group)
        score = [c / total for c in range(max(counts.values(), default=0) + 1)]
        return list(map(score.__getitem__, map(col.__getitem__, hosts)))
