"""The node agent's one door to the servers (the NodeService of the architecture page).

In-process today (``corral.service.node_api.LocalNodeService``); over gRPC when compute-only
hosts arrive. The agent depends on this Protocol only, never on server modules.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from corral.model import Assignment, Inventory, VmObservation

__all__ = ["NodeService"]


class NodeService(Protocol):
    async def register(
        self,
        node: str,
        *,
        address: str,
        driver: str,
        inventory: Inventory,
        labels: dict[str, str],
        roles: list[str],
    ) -> None:
        """Create or refresh this host's node record. Idempotent."""

    async def open_liveness(self, node: str, ttl_s: int) -> int:
        """Grant a lease, attach the node's liveness key to it, return the lease id."""

    async def keepalive(self, node: str, lease_id: int) -> int:
        """Refresh the node's liveness lease (and its heartbeat time); returns the remaining TTL,
        0 if it already expired. Idempotent."""

    async def close_liveness(self, node: str, lease_id: int) -> None:
        """Revoke the lease on a clean shutdown (the node turns not-ready at once)."""

    def assignments(self, node: str) -> AsyncIterator[dict[str, Assignment]]:
        """Yield the node's full set of assignments, once at first and again after each change.

        Survives compaction and store failover by re-listing; raises only when cancelled.
        """
        ...

    async def report(self, node: str, observations: list[VmObservation]) -> None:
        """Record what the node observed for these VMs (stale epochs are ignored)."""

    async def report_gone(self, node: str, vm: str, vm_id: str, epoch: int) -> None:
        """The VM no longer exists on this node after an unassignment (its disks are gone)."""
