"""The immutable view of the cluster the scheduler reads."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["NodeView", "Request", "Snapshot"]


@dataclass(frozen=True)
class NodeView:
    name: str
    state: str
    roles: tuple[str, ...]
    cpus: int
    memory_mib: int
    used_vcpus: int = 0
    used_memory_mib: int = 0
    vms: int = 0
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    vm: str
    vcpus: int
    memory_mib: int


@dataclass(frozen=True)
class Snapshot:
    nodes: tuple[NodeView, ...]
    cpu_allocation_ratio: float = 4.0
    memory_allocation_ratio: float = 1.0
