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
        out = []
        for i in hosts:
            a = (cu[i] + c) * ic[i]
            b = (mu[i] + m) * im[i]
            if not local:
                # pstdev of two values, without the statistics module's overhead.
                out.append(1.0 - abs(a - b) * 0.5)
                continue
            cap = sum(ix.pool_cap[i].values()) or 1
            d = (sum(ix.pool_used[i].values()) + sum(local.values())) / cap
            out.append(1.0 - statistics.pstdev((a, b, d)))
        return out
