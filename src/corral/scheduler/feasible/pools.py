"""Every pool the VM's disks live in must exist on the host, or be shared by all hosts."""

from __future__ import annotations

from itertools import filterfalse, repeat

from corral.scheduler.feasible.base import Rejected
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = ["NAME", "REASON_POOL_MISSING", "PoolFilter"]

NAME = "pools"
REASON_POOL_MISSING = "storage pool not on this node"


class PoolFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        return bool(request.disks)

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        local = [p for p in request.disks if p not in ix.shared_cap]
        if not local:
            return hosts
        for pool in local:
            present = ix.pool_hosts.get(pool, frozenset())
            if present.issuperset(hosts):
                continue
            missing = (NAME, f"{REASON_POOL_MISSING} ({pool})")
            rejected.update(zip(filterfalse(present.__contains__, hosts), repeat(missing)))
            hosts = list(filter(present.__contains__, hosts))
        return hosts
