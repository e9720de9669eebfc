"""Memory and CPU must fit within the host's capacity times its allocation ratio."""

from __future__ import annotations

from corral.scheduler.snapshot import NodeView, Request, Snapshot

__all__ = ["REASON_INSUFFICIENT_CPU", "REASON_INSUFFICIENT_MEMORY", "fits_cpu", "fits_memory"]

REASON_INSUFFICIENT_MEMORY = "insufficient memory"
REASON_INSUFFICIENT_CPU = "insufficient vcpus"


def memory_capacity(snapshot: Snapshot, node: NodeView) -> int:
    return int(node.memory_mib * snapshot.memory_allocation_ratio)


def cpu_capacity(snapshot: Snapshot, node: NodeView) -> int:
    return int(node.cpus * snapshot.cpu_allocation_ratio)


def fits_memory(snapshot: Snapshot, node: NodeView, request: Request) -> str | None:
    free = memory_capacity(snapshot, node) - node.used_memory_mib
    if request.memory_mib <= free:
        return None
    return f"{REASON_INSUFFICIENT_MEMORY} (needs {request.memory_mib} MiB, {max(free, 0)} free)"


def fits_cpu(snapshot: Snapshot, node: NodeView, request: Request) -> str | None:
    free = cpu_capacity(snapshot, node) - node.used_vcpus
    if request.vcpus <= free:
        return None
    return f"{REASON_INSUFFICIENT_CPU} (needs {request.vcpus}, {max(free, 0)} free)"
