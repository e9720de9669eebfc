"""A VM snapshot: an internal qcow2 snapshot of every disk of the VM, with or without its RAM.

Stored as ``/corral/v1/snapshots/<vm>.<snapshot>`` (``key_name``). Snapshots of one VM form a
tree: a new snapshot's ``parent`` is the VM's ``current`` snapshot (the one its disks were last
taken at or rolled back to), so rolling back to an old snapshot and taking a new one starts a
branch. Deleting a snapshot hands its children to its parent.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.model.common import Name, ObjectMeta, Strict

__all__ = [
    "SnapshotCreate",
    "SnapshotSpec",
    "SnapshotState",
    "SnapshotStatus",
    "VmSnapshot",
    "key_name",
]

SnapshotState = Literal["creating", "ready", "failed", "rolling-back", "deleting"]


def key_name(vm: str, snapshot: str) -> str:
    """The stored name of ``vm``'s snapshot ``snapshot`` (a '.' never occurs in a DNS label)."""
    return f"{vm}.{snapshot}"


class SnapshotCreate(Strict):
    """Body of ``POST /api/v1/vms/{vm}/snapshots``. ``memory`` unset: with the RAM when the VM
    runs, disk only when it is stopped."""

    name: Name
    memory: bool | None = None
    description: str = Field(default="", max_length=255)


class SnapshotSpec(Strict):
    vm: Name
    snapshot: Name
    memory: bool | None = None
    description: str = ""


class SnapshotStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: SnapshotState = "creating"
    vm_id: str = ""
    node: str | None = None
    parent: str | None = None
    current: bool = False
    with_memory: bool = False
    # What the VM was when the snapshot was taken (running, paused, stopped).
    vm_state: str = ""
    vm_state_bytes: int = 0
    # What QEMU reported as allocated in the VM's disk files just after the snapshot: internal
    # snapshots share clusters, so the growth from the parent's value is what was written in
    # between (QEMU reports no per-snapshot disk size).
    disk_bytes: int = 0
    # The volumes the snapshot covers.
    disks: list[str] = Field(default_factory=list)
    message: str = ""


class VmSnapshot(ObjectMeta):
    kind: Literal["snapshot"] = "snapshot"
    spec: SnapshotSpec
    status: SnapshotStatus = Field(default_factory=SnapshotStatus)
