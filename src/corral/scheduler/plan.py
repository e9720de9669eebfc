"""``schedule(snapshot, request) -> Plan``: pure placement, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.scheduler.feasible import FILTERS
from corral.scheduler.rank import spread
from corral.scheduler.snapshot import Request, Snapshot

__all__ = ["Plan", "schedule"]


@dataclass(frozen=True)
class Plan:
    """The chosen node (or None) with every other node's rejection reason or score."""

    vm: str
    node: str | None
    score: float = 0.0
    rejected: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    def explain(self) -> str:
        if self.node is not None:
            return f"placing vm {self.vm} on node {self.node} (score {self.score:.2f})"
        if not self.rejected:
            return f"vm {self.vm} cannot be placed: the cluster has no nodes"
        reasons = "; ".join(f"{n}: {r}" for n, r in sorted(self.rejected.items()))
        return f"vm {self.vm} cannot be placed: {reasons}"


def schedule(snapshot: Snapshot, request: Request) -> Plan:
    rejected: dict[str, str] = {}
    scores: dict[str, float] = {}
    for node in snapshot.nodes:
        for check in FILTERS:
            reason = check(snapshot, node, request)
            if reason is not None:
                rejected[node.name] = reason
                break
        else:
            scores[node.name] = spread(snapshot, node, request)
    if not scores:
        return Plan(request.vm, None, rejected=rejected)
    # Highest score wins; ties go to the name first in order so plans are deterministic.
    best = min(scores, key=lambda n: (-scores[n], n))
    return Plan(request.vm, best, scores[best], rejected, scores)
