"""Failure-domain spread (``spread_over: zone|rack``): the host must carry that label, and the
VM's group must stay evenly spread over its values.

Among the domains (label values) that still have a host able to take the VM, the VM may only go
to one holding the fewest members of its group. Runs last, over the hosts every other filter
accepted, so a full or cordoned zone does not block the rest. Without a group only the label is
required.
"""

from __future__ import annotations

import operator
from functools import partial
from itertools import compress
from typing import cast

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
        # Each candidate's domain (None: it has no such label).
        values = ix.label_values(key)
        found = list(map(values.__getitem__, hosts))
        # Most often every host of the snapshot carries the label (checked once).
        if not ix.static((NAME, key), partial(operator.contains, values, None)):
            labelled = hosts
            domains = cast("list[str]", found)  # no None in it
        elif None in found:
            unlabelled = (NAME, f"{REASON_NO_DOMAIN_LABEL} ({key})")
            rejected.update((i, unlabelled) for i, d in zip(hosts, found, strict=True) if d is None)
            labelled = [i for i, d in zip(hosts, found, strict=True) if d is not None]
            domains = [d for d in found if d is not None]
        else:
            labelled = hosts
            domains = cast("list[str]", found)  # no None in it
        if request.group is None or not labelled:
            return labelled
        group = request.group
        # Members of the group per domain (over every host with the label), for the domains
        # that can take the VM.
        members = ix.domain_counts(group, key, excluding=request.vm)
        counts = {d: members.get(d, 0) for d in set(domains)}
        fewest = min(counts.values())
        crowded = {d for d, n in counts.items() if n != fewest}
        if not crowded:
            return labelled
        best = min(d for d, n in counts.items() if n == fewest)
        # One sentence per crowded domain.
        said = {
            d: (
                NAME,
                f"{REASON_DOMAIN_CROWDED} ({key}={d} holds {counts[d]} of group {group}, "
                f"{key}={best} holds {fewest})",
            )
            for d in crowded
        }
        crowd = list(map(crowded.__contains__, domains))
        rejected.update(
            zip(
                compress(labelled, crowd),
                map(said.__getitem__, compress(domains, crowd)),
                strict=True,
            )
        )
        fine = counts.keys() - crowded
        return list(compress(labelled, map(fine.__contains__, domains)))
