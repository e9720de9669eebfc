"""What the leader asks one node to run, and what that node reports back."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.model.migration import IncomingMigration, MigrationReport, OutgoingMigration
from corral.model.vm import VmSpec

__all__ = [
    "ALLOCATING_DISKS",
    "STARTING_HYPERVISOR",
    "AssignedBoot",
    "AssignedDisk",
    "AssignedImageFile",
    "Assignment",
    "ObservedState",
    "VmObservation",
]

ALLOCATING_DISKS = "allocating disks"
"""The message of a ``starting`` observation while the host makes the VM's volume files."""
STARTING_HYPERVISOR = "disks ready; starting the hypervisor"
"""The message of a ``starting`` observation once the disks are there."""

ObservedState = Literal["starting", "running", "paused", "stopping", "stopped", "crashed", "failed"]


class AssignedImageFile(BaseModel):
    """A file of an image, as a host fetches it: from any server, checked against sha256."""

    model_config = ConfigDict(extra="forbid")

    image: str
    image_id: str
    file: str
    sha256: str
    size_bytes: int
    format: str | None = None


class AssignedDisk(BaseModel):
    """A VM disk with everything its host needs to find or create the volume's file."""

    model_config = ConfigDict(extra="forbid")

    volume: str
    volume_id: str
    file_name: str
    pool: str
    # None: the host's own <data-dir>/pools/<pool>.
    pool_path: str | None = None
    shared: bool = False
    size_gib: int
    format: Literal["qcow2"] = "qcow2"
    image: AssignedImageFile | None = None
    full_clone: bool = False
    # The host that created the file: a host finding it missing reports the loss instead of
    # making a blank disk in its place.
    created_on: str | None = None


class AssignedBoot(BaseModel):
    """How the VM boots: its image's kernel (and initrd), or the firmware from the first disk
    (``kernel`` None)."""

    model_config = ConfigDict(extra="forbid")

    kernel: AssignedImageFile | None = None
    initrd: AssignedImageFile | None = None
    cmdline: str = ""


class Assignment(BaseModel):
    """Stored at ``/corral/v1/assign/<node>/<vm>``.

    ``epoch`` grows each time the VM is placed; a node refuses to act on an assignment whose
    epoch is older than one it has already seen for that VM. ``generation`` is the VM's intent
    generation; ``reboot_generation`` the generation of the last reboot request;
    ``power_generation`` the generation of the last power request (see ``Vm``).
    """

    model_config = ConfigDict(extra="forbid")

    vm: str
    vm_id: str
    node: str
    epoch: int
    generation: int
    reboot_generation: int = 0
    power_generation: int = 0
    # Power off at once instead of a graceful shutdown when stopping (``vm stop --force``).
    force_stop: bool = False
    spec: VmSpec
    disks: list[AssignedDisk] = Field(default_factory=list)
    # None: boot from the first disk (or, for a VM without an image, the host's default guest).
    boot: AssignedBoot | None = None
    # A live migration in flight (see ``corral.control.migrations``): the target's assignment
    # carries ``incoming``, the source's ``outgoing``.
    incoming: IncomingMigration | None = None
    outgoing: OutgoingMigration | None = None


class VmObservation(BaseModel):
    """One VM as its node saw it just now; never what the node hoped."""

    model_config = ConfigDict(extra="forbid")

    vm: str
    vm_id: str
    epoch: int
    state: ObservedState
    observed_generation: int
    started_at: datetime | None = None
    message: str = ""
    # What the hypervisor says about the running VM (e.g. qemu.pid, qemu.accel, qemu.vnc).
    runtime: dict[str, str] = Field(default_factory=dict)
    # The files of the VM's volumes on this host (volume name -> path), once they exist.
    volumes: dict[str, str] = Field(default_factory=dict)
    # This host's side of a live migration of the VM, while one is in flight.
    migration: MigrationReport | None = None
