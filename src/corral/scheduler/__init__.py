"""Pure placement: feasible/ filters, rank/ scorers, plan.schedule. Never does I/O."""

from corral.scheduler.plan import Plan, schedule
from corral.scheduler.snapshot import NodeView, Request, Snapshot

__all__ = ["NodeView", "Plan", "Request", "Snapshot", "schedule"]
