"""``spread`` policy: prefer the least loaded host, i.e. the most free vCPU and memory
(as fractions of capacity) left after placement."""

from __future__ import annotations

from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Policy, Request

__all__ = ["NAME", "SpreadScorer"]

NAME = "spread"


class SpreadScorer:
    name = NAME

    def weight(self, ix: ClusterIndex, request: Request, policy: Policy) -> float:
        return 1.0 if policy == NAME else 0.0

    def score(self, ix: ClusterIndex, request: Request, hosts: list[int]) -> list[float]:
        c, m = request.vcpus, request.memory_mib
        load, ch, mh = ix.load, ix.cpu_half, ix.mem_half

        # Feasible hosts have cap >= used + need, so each fraction is in [0, 1].
        def one(i: int) -> float:
            return 1.0 - load[i] - c * ch[i] - m * mh[i]

        def every() -> list[float]:
            return [1.0 - x - c * a - m * b for x, a, b in zip(load, ch, mh, strict=True)]

        # The score of every host for this VM size, kept up to date between placements.
        col = ix.column((NAME, c, m), every, one)
        return list(map(col.__getitem__, hosts))
