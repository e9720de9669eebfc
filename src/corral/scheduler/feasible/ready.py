"""A host takes VMs only while its node record says ``ready``."""

from __future__ import annotations

from corral.scheduler.snapshot import NodeView

__all__ = ["NAME", "REASON_NOT_READY", "ReadyFilter"]

NAME = "ready"
REASON_NOT_READY = "node is not ready"


class ReadyFilter:
    name = NAME

    def check(self, node: NodeView) -> str | None:
        return None if node.state == "ready" else f"{REASON_NOT_READY} ({node.state})"
