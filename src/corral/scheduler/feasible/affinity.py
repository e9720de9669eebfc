"""Hard affinity: the VM must share a host with the VM it names (``affinity_vm``), with the
members of its ``affinity`` group, and with any VM whose own affinity names it.

A group with no other member placed yet, and a VM nobody names, leave every host open. A VM
named by an affinity that is not placed anywhere closes every host (placing it anywhere could
separate the two).
"""

from __future__ import annotations

from corral.scheduler.feasible.base import Rejected
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = ["NAME", "REASON_AFFINITY", "REASON_AFFINITY_UNPLACED", "AffinityFilter"]

NAME = "affinity"
REASON_AFFINITY = "affinity requires another node"
REASON_AFFINITY_UNPLACED = "affinity names a vm that is not placed"


class AffinityFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        # Cheap over-approximation; run() finds out whether anything really binds.
        return True

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        # Each entry: the hosts allowed and the sentence for the others.
        rules: list[tuple[set[int], str]] = []
        if request.affinity_vm is not None and request.affinity_vm != request.vm:
            at = ix.vm_host.get(request.affinity_vm)
            if at is None:
                why = f"{REASON_AFFINITY_UNPLACED} ({request.affinity_vm})"
                for i in hosts:
                    rejected[i] = (NAME, why)
                return []
            rules.append(
                ({at}, f"{REASON_AFFINITY} (vm {request.affinity_vm} is on {ix.names[at]})")
            )
        group = ix.groups.get(request.group) if request.group is not None else None
        if group is not None and group.policy == "affinity":
            assert request.group is not None
            where = set(ix.group_counts(request.group, excluding=request.vm))
            if where:
                on = ", ".join(sorted(ix.names[i] for i in where))
                rules.append((where, f"{REASON_AFFINITY} (group {group.name} is on {on})"))
        for other in sorted(ix.affinity_refs.get(request.vm, ())):
            at = ix.vm_host.get(other)
            if at is not None and other != request.vm:
                rules.append(
                    ({at}, f"{REASON_AFFINITY} (vm {other} must stay with it on {ix.names[at]})")
                )
        if not rules:
            return hosts
        ok = []
        for i in hosts:
            for allowed, why in rules:
                if i not in allowed:
                    rejected[i] = (NAME, why)
                    break
            else:
                ok.append(i)
        return ok
