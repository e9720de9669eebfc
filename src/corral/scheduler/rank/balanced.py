"""``balanced`` policy: prefer the host whose resources end up most evenly used, i.e. the
lowest spread (population standard deviation) of its vCPU, memory and, for a VM with local
disks, disk fractions after placement. Score = 1 - that deviation."""

from __future__ import annotations

import statistics

from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Policy, Request

__all__ = ["NAME", "BalancedScorer"]

NAME = "balanced"


class BalancedScorer:
    name = NAME

    def weight(self, ix: ClusterIndex, request: Request, policy: Policy) -> float:
        return 1.0 if policy == NAME else 0.0

    def score(self, ix: ClusterIndex, request: Request, hosts: list[int]) -> list[float]:
        c, m = request.vcpus, request.memory_mib
        cu, ic, mu, im = ix.cpu_used, ix.cpu_inv, ix.mem_used, ix.mem_inv
        local = {p: n for p, n in request.disks.items() if p not in ix.shared_cap}
        # Only the total of the local disks counts (None: no local disk, no disk fraction).
        disk = sum(local.values()) if local else None

        def one(i: int) -> float:
            a = (cu[i] + c) * ic[i]
            b = (mu[i] + m) * im[i]
            if disk is None:
                # pstdev of two values, without the statistics module's overhead.
                return 1.0 - abs(a - b) * 0.5
            cap = sum(ix.pool_cap[i].values()) or 1
            d = (sum(ix.pool_used[i].values()) + disk) / cap
            return 1.0 - statistics.pstdev((a, b, d))

        def every() -> list[float]:
            if disk is None:
                return [
                    1.0 - abs((u + c) * x - (v + m) * y) * 0.5
                    for u, x, v, y in zip(cu, ic, mu, im, strict=True)
                ]
            return [one(i) for i in range(len(cu))]

        # The score of every host for this VM size, kept up to date between placements.
        col = ix.column((NAME, c, m, disk), every, one)
        return list(map(col.__getitem__, hosts))
