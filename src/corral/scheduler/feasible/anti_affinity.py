"""Hard anti-affinity: at most ``max_per_node`` members of the VM's ``anti-affinity`` group
on one host (1 unless the group says otherwise)."""

from __future__ import annotations

from corral.scheduler.feasible.base import Rejected, without
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = ["NAME", "REASON_ANTI_AFFINITY", "AntiAffinityFilter"]

NAME = "anti-affinity"
REASON_ANTI_AFFINITY = "anti-affinity group is full on this node"


class AntiAffinityFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        return request.group is not None

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        assert request.group is not None
        group = ix.groups.get(request.group)
        if group is None or group.policy != "anti-affinity":
            return hosts
        limit = group.max_per_node
        # Hosts where one more member would be one too many (kept up to date by the index).
        full = ix.full_hosts(group.name, limit, excluding=request.vm)
        if not full:
            return hosts
        per_host = ix.group_counts(group.name, excluding=request.vm)
        bad = list(filter(full.__contains__, hosts))
        members = list(map(per_host.__getitem__, bad))
        # One sentence per number of members (most full hosts hold the same number).
        said = {
            n: (
                NAME,
                f"{REASON_ANTI_AFFINITY} (group {group.name} has {n} here, max_per_node {limit})",
            )
            for n in set(members)
        }
        rejected.update(zip(bad, map(said.__getitem__, members), strict=True))
        return without(hosts, bad)
