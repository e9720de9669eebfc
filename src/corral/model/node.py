"""A host of the cluster: its roles, inventory and health."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.model.common import ObjectMeta

__all__ = [
    "Allocated",
    "GossipState",
    "HostCpu",
    "Inventory",
    "Node",
    "NodeRole",
    "NodeSpec",
    "NodeState",
    "NodeStatus",
    "PoolUsage",
    "cpu_gap",
]

NodeRole = Literal["server", "compute"]
NodeState = Literal["ready", "not-ready", "down", "unreachable", "left"]
GossipState = Literal["alive", "suspect", "failed", "leaving", "left", "unknown"]
_DEFAULT_ROLES: tuple[NodeRole, ...] = ("server", "compute")


class PoolUsage(BaseModel):
    """One storage pool's directory on one host: its filesystem and what corral's volumes in it
    take (thin qcow2: ``allocated_bytes`` is what is written, not the virtual size)."""

    model_config = ConfigDict(extra="forbid")

    path: str
    total_bytes: int
    free_bytes: int
    volumes: int = 0
    allocated_bytes: int = 0


class HostCpu(BaseModel):
    """The CPU a guest sees under KVM with ``-cpu host`` on this host, as QEMU expands it
    (``query-cpu-model-expansion`` of model ``host``): vendor, model name and every feature
    that is on."""

    model_config = ConfigDict(extra="forbid")

    vendor: str
    model: str
    features: list[str] = Field(default_factory=list)


def cpu_gap(source: HostCpu | None, target: HostCpu | None) -> str | None:
    """Why a guest started with ``-cpu host`` on ``source`` cannot move live to ``target``
    (None: it can). The guest keeps using every CPU feature it found at boot, so the target
    must offer all of them, from the same vendor (Nova and libvirt compare the same way)."""
    if source is None:
        return "the source host did not report its CPU (it runs guests without KVM?)"
    if target is None:
        return "it runs guests without KVM (or did not report its CPU)"
    if source.vendor != target.vendor:
        return f"its CPU is {target.vendor}, the source's {source.vendor}"
    missing = sorted(set(source.features) - set(target.features))
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        return f"its CPU ({target.model}) lacks features the guest may use: {shown}"
    return None


class Inventory(BaseModel):
    """What the host has, measured by its agent at start (pools: refreshed every minute)."""

    model_config = ConfigDict(extra="forbid")

    cpus: int
    memory_mib: int
    disk_gib: float
    disk_free_gib: float
    hostname: str
    kernel: str
    corral_version: str
    driver: str
    pools: dict[str, PoolUsage] = Field(default_factory=dict)
    cpu: HostCpu | None = Field(
        default=None, description="the CPU guests see under KVM; None: no KVM guests here"
    )


class Allocated(BaseModel):
    """What the VMs placed on the host take."""

    model_config = ConfigDict(extra="forbid")

    vcpus: int = 0
    memory_mib: int = 0
    vms: int = 0


class NodeSpec(BaseModel):
    """Labels and roles come from the agent's flags; the rest is set through the API and kept
    when the agent restarts."""

    model_config = ConfigDict(extra="forbid")

    labels: dict[str, str] = Field(default_factory=dict)
    roles: list[NodeRole] = Field(default_factory=lambda: list(_DEFAULT_ROLES))
    cordoned: bool = Field(default=False, description="takes no new VMs (set by drain)")
    maintenance: bool = Field(
        default=False, description="an operator works on it: no VMs, not counted for capacity"
    )
    reserved_vcpus: int = Field(default=0, ge=0, le=4096, description="kept for the host")
    reserved_memory_mib: int = Field(default=0, ge=0, description="kept for the host")
    cpu_allocation_ratio: float | None = Field(
        default=None, gt=0, le=1000, description="overcommit; default: the cluster's"
    )
    memory_allocation_ratio: float | None = Field(
        default=None, gt=0, le=100, description="overcommit; default: the cluster's"
    )


class NodeStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: NodeState = "not-ready"
    address: str = ""
    driver: str = ""
    inventory: Inventory | None = None
    allocated: Allocated = Field(default_factory=Allocated)
    heartbeat_at: datetime | None = None
    registered_at: datetime | None = None
    message: str = ""
    # The second opinion: how the other hosts see this one over gossip (Serf).
    gossip: GossipState = "unknown"
    gossip_since: datetime | None = None
    grpc_address: str = ""
    gossip_address: str = ""
    # Server hosts: this host's etcd member.
    etcd_peer_url: str = ""
    etcd_client_url: str = ""


class Node(ObjectMeta):
    kind: Literal["node"] = "node"
    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus = Field(default_factory=NodeStatus)
