"""Failure-domain spread (``spread_over: zone|rack``): the host must carry that label, and the
VM's group must stay evenly spread over its values.

Among the domains (label values) that still have a host able to take the VM, the VM may only go
to one holding the fewest members of its group. Runs last, over the hosts every other filter
accepted, so a full or cordoned zone does not block the rest. Without a group only the label is
required.
"""

from __future__ import annotations

from corral.scheduler.feasible.base import Rejected
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = ["NAME", "REASON_DOMAIN_CROWDED", "REASON_NO_DOMAIN_LABEL", "FailureDomainFilter"]

NAME = "spread-over"
REASON_NO_DOMAIN_LABEL = "node has no failure-domain label"
REASON_DOMAIN_CROWDED = "failure domain holds more of the group than another"


class FailureDomainFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        return request.spread_over is not None

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        key = request.spread_over
        assert key is not None
        domain_of = ix.labels_of(key)
        labelled = [i for i in hosts if i in domain_of]
        if len(labelled) != len(hosts):
            for i in hosts:
                if i not in domain_of:
                    rejected[i] = (NAME, f"{REASON_NO_DOMAIN_LABEL} ({key})")
        if request.group is None or not labelled:
            return labelled
        group = request.group
        counts = dict.fromkeys({domain_of[i] for i in labelled}, 0)
        for i, n in ix.group_counts(group, excluding=request.vm).items():
            d = domain_of.get(i)
            if d is not None and d in counts:
                counts[d] += n
        fewest = min(counts.values())
        crowded = {d for d, n in counts.items() if n != fewest}
        if not crowded:
            return labelled
        best = min(d for d, n in counts.items() if n == fewest)
        ok = []
        for i in labelled:
            d = domain_of[i]
            if d in crowded:
                rejected[i] = (
                    NAME,
                    f"{REASON_DOMAIN_CROWDED} ({key}={d} holds {counts[d]} of group {group}, "
                    f"{key}={best} holds {fewest})",
                )
            else:
                ok.append(i)
        return ok
