"""Pure placement: feasible/ filters, rank/ scorers, stack.schedule, rebalance. Never does I/O."""

from corral.scheduler.index import ClusterIndex
from corral.scheduler.plan import Plan, PlanRow
from corral.scheduler.rebalance import Move, imbalance, plan_moves
from corral.scheduler.snapshot import (
    Group,
    NodeView,
    PlacedVm,
    Policy,
    PoolView,
    Request,
    Snapshot,
)
from corral.scheduler.stack import Scheduler, schedule

__all__ = [
    "ClusterIndex",
    "Group",
    "Move",
    "NodeView",
    "PlacedVm",
    "Plan",
    "PlanRow",
    "Policy",
    "PoolView",
    "Request",
    "Scheduler",
    "Snapshot",
    "imbalance",
    "plan_moves",
    "schedule",
]
