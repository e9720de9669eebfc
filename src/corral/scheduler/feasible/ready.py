"""A node takes new VMs only while it is ready and has the compute role."""

from __future__ import annotations

from corral.scheduler.snapshot import NodeView, Request, Snapshot

__all__ = ["REASON_NOT_COMPUTE", "REASON_NOT_READY", "is_compute", "is_ready"]

REASON_NOT_READY = "node is not ready"
REASON_NOT_COMPUTE = "node does not have the compute role"


def is_ready(snapshot: Snapshot, node: NodeView, request: Request) -> str | None:
    return None if node.state == "ready" else f"{REASON_NOT_READY} ({node.state})"


def is_compute(snapshot: Snapshot, node: NodeView, request: Request) -> str | None:
    return None if "compute" in node.roles else REASON_NOT_COMPUTE
