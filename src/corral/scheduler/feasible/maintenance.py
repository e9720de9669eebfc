"""A host that is draining (cordoned) or in maintenance takes no new VMs."""

from __future__ import annotations

from corral.scheduler.snapshot import NodeView

__all__ = ["NAME", "REASON_CORDONED", "REASON_MAINTENANCE", "MaintenanceFilter"]

NAME = "maintenance"
REASON_MAINTENANCE = "node is in maintenance"
REASON_CORDONED = "node is cordoned (draining)"


class MaintenanceFilter:
    name = NAME

    def check(self, node: NodeView) -> str | None:
        if node.maintenance:
            return REASON_MAINTENANCE
        if node.cordoned:
            return REASON_CORDONED
        return None
