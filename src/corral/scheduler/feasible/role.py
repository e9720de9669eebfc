"""Only hosts with the ``compute`` role run VMs (a server-only host runs etcd and the API)."""

from __future__ import annotations

from corral.scheduler.snapshot import NodeView

__all__ = ["NAME", "REASON_NOT_COMPUTE", "RoleFilter"]

NAME = "role"
REASON_NOT_COMPUTE = "node does not have the compute role"


class RoleFilter:
    name = NAME

    def check(self, node: NodeView) -> str | None:
        return None if "compute" in node.roles else REASON_NOT_COMPUTE
