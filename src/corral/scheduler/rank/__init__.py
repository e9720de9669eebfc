"""Scorers: one per module, each a score in [0, 1] per feasible host and a weight.

=================== ======================================== ===========================
name                prefers                                   weight
=================== ======================================== ===========================
spread              least loaded host (policy ``spread``)     1 when it is the policy
binpack             most loaded host that fits (``binpack``)  1 when it is the policy
balanced            most even vCPU/memory/disk use            1 when it is the policy
soft-affinity       hosts holding the VM's group              the group's weight
soft-anti-affinity  hosts holding few of the VM's group       the group's weight
priority            hosts with few VMs of equal/higher prio   0.5 when priority > 0
=================== ======================================== ===========================

The policy is the request's ``policy`` if set, else the snapshot's default.
"""

from __future__ import annotations

from corral.scheduler.rank.balanced import BalancedScorer
from corral.scheduler.rank.base import Scorer
from corral.scheduler.rank.binpack import BinpackScorer
from corral.scheduler.rank.priority import PriorityScorer
from corral.scheduler.rank.soft_affinity import SoftAffinityScorer
from corral.scheduler.rank.soft_anti_affinity import SoftAntiAffinityScorer
from corral.scheduler.rank.spread import SpreadScorer

__all__ = ["SCORERS", "Scorer"]

SCORERS: tuple[Scorer, ...] = (
    SpreadScorer(),
    BinpackScorer(),
    BalancedScorer(),
    SoftAffinityScorer(),
    SoftAntiAffinityScorer(),
    PriorityScorer(),
)
