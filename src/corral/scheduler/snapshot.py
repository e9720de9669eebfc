"""The immutable view of the cluster the scheduler reads, and what a placement asks for.

The leader builds one :class:`Snapshot` from node records and the VMs placed on them; the
scheduler never reads anything else. Usage figures on :class:`NodeView` (``used_vcpus``,
``used_memory_mib``, each pool's ``used_bytes``) are authoritative: they count everything on the
host, including the VMs listed in :attr:`Snapshot.vms`. The VM list is what the group rules
(affinity, anti-affinity, failure-domain spread), the soft scorers and the rebalancer look at.

Capacity of a host = ``(total - reserved) * allocation ratio``, rounded down; the ratio is the
host's own when it sets one, else the cluster's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "GROUP_POLICIES",
    "POLICIES",
    "Group",
    "GroupPolicy",
    "NodeView",
    "PlacedVm",
    "Policy",
    "PoolView",
    "Request",
    "Snapshot",
]

Policy = Literal["spread", "binpack", "balanced"]
POLICIES: tuple[Policy, ...] = ("spread", "binpack", "balanced")

# Hard policies filter hosts out; soft ones only move the score by the group's weight.
GroupPolicy = Literal["anti-affinity", "affinity", "soft-anti-affinity", "soft-affinity"]
GROUP_POLICIES: tuple[GroupPolicy, ...] = (
    "anti-affinity",
    "affinity",
    "soft-anti-affinity",
    "soft-affinity",
)


@dataclass(frozen=True)
class PoolView:
    """A storage pool: what it holds and what its disks already take, in bytes."""

    capacity_bytes: int
    used_bytes: int = 0


@dataclass(frozen=True)
class NodeView:
    """One host as the scheduler sees it.

    ``state`` is the node record's state (only ``ready`` takes VMs); ``cordoned`` is set while
    the host drains, ``maintenance`` while an operator works on it. ``accelerators`` holds what
    QEMU can use there (``kvm``, ``tcg``); ``qemu_version`` and ``machine_types`` decide whether
    a running VM can migrate in. ``pools`` are the host's local storage pools by name.
    """

    name: str
    state: str
    roles: tuple[str, ...]
    cpus: int
    memory_mib: int
    used_vcpus: int = 0
    used_memory_mib: int = 0
    vms: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    reserved_vcpus: int = 0
    reserved_memory_mib: int = 0
    cpu_allocation_ratio: float | None = None
    memory_allocation_ratio: float | None = None
    cordoned: bool = False
    maintenance: bool = False
    pools: Mapping[str, PoolView] = field(default_factory=dict)
    accelerators: frozenset[str] = frozenset()
    qemu_version: tuple[int, ...] | None = None
    machine_types: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Group:
    """A placement group. ``max_per_node`` bounds members per host under ``anti-affinity``;
    ``weight`` scales the soft policies' score (hard policies ignore it)."""

    name: str
    policy: GroupPolicy
    max_per_node: int = 1
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.policy not in GROUP_POLICIES:
            raise ValueError(
                f"group {self.name}: policy must be one of {', '.join(GROUP_POLICIES)}, "
                f"not {self.policy!r}"
            )
        if self.max_per_node < 1:
            raise ValueError(f"group {self.name}: max_per_node must be >= 1")
        if self.weight < 0:
            raise ValueError(f"group {self.name}: weight must be >= 0")


@dataclass(frozen=True)
class Request:
    """What one VM needs from a host.

    ``disks`` maps a pool name to the bytes the VM's disks take in it. ``node_selector`` labels
    must equal the host's; ``required_labels`` must merely be present. ``affinity_vm`` names a VM
    this one must share a host with. ``spread_over`` is a host label key (``zone``, ``rack``):
    the VM's group is kept evenly spread over that label's values. ``policy`` overrides the
    cluster's default scorer. For a live migration, ``source`` is the host it runs on and
    ``machine_type`` / ``source_qemu_version`` what the target must be able to receive.
    """

    vm: str
    vcpus: int
    memory_mib: int
    disks: Mapping[str, int] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    required_labels: tuple[str, ...] = ()
    group: str | None = None
    affinity_vm: str | None = None
    spread_over: str | None = None
    requires_kvm: bool = False
    priority: int = 0
    policy: Policy | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None
    source_qemu_version: tuple[int, ...] | None = None
    machine_type: str | None = None

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")

    @property
    def migrating(self) -> bool:
        return self.source is not None


@dataclass(frozen=True)
class PlacedVm:
    """A VM already on ``node``, with the request it was placed with (its constraints)."""

    node: str
    request: Request

    @property
    def name(self) -> str:
        return self.request.vm


@dataclass(frozen=True)
class Snapshot:
    """The cluster at one revision. ``policy`` is the default scorer a request may override."""

    nodes: tuple[NodeView, ...]
    cpu_allocation_ratio: float = 4.0
    memory_allocation_ratio: float = 1.0
    vms: tuple[PlacedVm, ...] = ()
    groups: Mapping[str, Group] = field(default_factory=dict)
    shared_pools: Mapping[str, PoolView] = field(default_factory=dict)
    policy: Policy = "spread"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
