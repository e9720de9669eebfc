"""Spread: prefer the node with the most free memory and CPU after placement."""

from __future__ import annotations

from corral.scheduler.feasible.capacity import cpu_capacity, memory_capacity
from corral.scheduler.snapshot import NodeView, Request, Snapshot

__all__ = ["spread"]


def spread(snapshot: Snapshot, node: NodeView, request: Request) -> float:
    mem_cap = max(memory_capacity(snapshot, node), 1)
    cpu_cap = max(cpu_capacity(snapshot, node), 1)
    mem_free = 1 - (node.used_memory_mib + request.memory_mib) / mem_cap
    cpu_free = 1 - (node.used_vcpus + request.vcpus) / cpu_cap
    return round(max(0.0, (mem_free + cpu_free) / 2), 4)
