"""The VM: what a user asks for (spec) and what corral observed (status)."""

from __future__ import annotations

import os
import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from corral.model.common import Labels, Name, ObjectMeta, Strict, _check_labels

__all__ = [
    "RESTART_POLICIES",
    "VM_STATES",
    "PlacementPolicy",
    "PowerState",
    "RestartPolicy",
    "Vm",
    "VmCreate",
    "VmDisk",
    "VmNic",
    "VmSpec",
    "VmState",
    "VmStatus",
    "new_mac",
]

PowerState = Literal["running", "stopped", "paused"]
# How the scheduler ranks the hosts that fit (``ClusterConfig.placement_policy`` by default).
PlacementPolicy = Literal["spread", "binpack", "balanced"]
MAX_PRIORITY = 1000
# What the node does when a VM goes down on its own (see ``VmSpec.restart_policy``).
RestartPolicy = Literal["always", "on-failure", "never"]
RESTART_POLICIES: tuple[str, ...] = RestartPolicy.__args__  # type: ignore[attr-defined]
VmState = Literal[
    "pending",
    "starting",
    "running",
    "paused",
    "migrating",
    "stopping",
    "stopped",
    "crashed",
    "lost",
    "failed",
    "deleting",
]
VM_STATES: tuple[str, ...] = VmState.__args__  # type: ignore[attr-defined]

MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 4 * 1024 * 1024
MAX_VCPUS = 256
MAX_DISKS = 16
MAX_NICS = 8
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


def new_mac() -> str:
    """A random MAC in QEMU's locally administered 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


class VmDisk(Strict):
    """One disk of a VM: a volume (``corral volume ls``); the first one is the boot disk."""

    volume: Name


class VmNic(Strict):
    """One virtio network card (user-mode networking for now); ``mac`` unset: corral picks one
    in 52:54:00:xx:xx:xx when the VM is created (and a new one for every clone)."""

    mac: str | None = None

    @field_validator("mac")
    @classmethod
    def _mac(cls, mac: str | None) -> str | None:
        if mac is None:
            return None
        mac = mac.lower()
        if not _MAC_RE.match(mac):
            raise ValueError("must be six hex pairs separated by ':', e.g. 52:54:00:12:34:56")
        if int(mac[:2], 16) & 1:
            raise ValueError("must be a unicast address (the first byte even)")
        return mac


class VmSpec(Strict):
    """What the user asked for, with defaults filled in."""

    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS, description="virtual CPUs")
    memory_mib: int = Field(
        default=512, ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB, description="guest RAM in MiB"
    )
    labels: Labels = Field(default_factory=dict)
    power_state: PowerState = Field(
        default="running",
        description="running: keep it started; stopped: keep it off; paused: started, vCPUs frozen",
    )
    restart_policy: RestartPolicy = Field(
        default="on-failure",
        description=(
            "when the VM goes down on its own: on-failure restarts it after a crash (not after "
            "the guest powered itself off); always restarts it either way; never leaves it down"
        ),
    )
    image: Name | None = Field(
        default=None, description="the image the VM boots the way of (its kernel, cmdline)"
    )
    disks: list[VmDisk] = Field(default_factory=list, max_length=MAX_DISKS)
    nics: list[VmNic] = Field(default_factory=list, max_length=MAX_NICS)
    # -- placement (see ``corral vm why``) --
    group: Name | None = Field(default=None, description="placement group (`corral group ls`)")
    node_selector: Labels = Field(
        default_factory=dict, description="host labels that must have exactly these values"
    )
    required_labels: list[str] = Field(
        default_factory=list, max_length=64, description="host label keys that must be present"
    )
    affinity_vm: Name | None = Field(default=None, description="run on the host of this VM")
    spread_over: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_./]{0,61}[A-Za-z0-9])?$",
        description="host label key (zone, rack): keep the group evenly spread over its values",
    )
    priority: int = Field(
        default=0,
        ge=0,
        le=MAX_PRIORITY,
        description="higher: placed first, and kept apart from VMs of equal or higher priority",
    )
    placement_policy: PlacementPolicy | None = Field(
        default=None, description="spread | binpack | balanced; default: the cluster's"
    )

    @field_validator("required_labels")
    @classmethod
    def _label_keys(cls, keys: list[str]) -> list[str]:
        _check_labels(dict.fromkeys(keys, ""))
        return keys

    @field_validator("disks")
    @classmethod
    def _distinct_disks(cls, disks: list[VmDisk]) -> list[VmDisk]:
        seen: set[str] = set()
        for disk in disks:
            if disk.volume in seen:
                raise ValueError(f"volume {disk.volume!r} is listed twice")
            seen.add(disk.volume)
        return disks


_CREATE_ONLY = {"name", "disk_gib", "pool", "full_clone"}


class VmCreate(VmSpec):
    """Body of ``POST /api/v1/vms``: the spec plus the name.

    With ``image``, a boot volume ``<name>-disk0`` is made from it in ``pool`` (a linked clone
    unless ``full_clone``), ``disk_gib`` big (default: the image's size), and put first in
    ``disks``.
    """

    name: Name
    disk_gib: int | None = Field(default=None, ge=1, le=64 * 1024)
    pool: Name = "local"
    full_clone: bool = False

    def spec(self) -> VmSpec:
        return VmSpec.model_validate(self.model_dump(exclude=_CREATE_ONLY))


class VmStatus(BaseModel):
    """What corral observed; written by the leader (placement) and the node (runtime)."""

    model_config = ConfigDict(extra="forbid")

    state: VmState = "pending"
    node: str | None = None
    message: str = ""
    started_at: datetime | None = None
    observed_generation: int = 0
    epoch: int = 0
    # The placement epoch a host last reported this VM at (None: never reported). Lower than
    # ``epoch`` while the host of the current placement has not reported it yet.
    observed_epoch: int | None = None
    # What the hypervisor reports about the running VM (qemu.pid, qemu.accel, qemu.vnc, ...).
    runtime: dict[str, str] = Field(default_factory=dict)


class Vm(ObjectMeta):
    """A stored VM.

    ``generation`` counts every change of intent (spec change or action); the node reports the
    generation it last applied as ``status.observed_generation``. ``reboot_generation`` is the
    generation of the last reboot request; the node reboots when it has not yet applied it.
    ``power_generation`` is the generation of the last power request (create, start, stop,
    pause, resume): a VM that is down although the node applied that request went down on its
    own, and only ``spec.restart_policy`` decides whether it is started again.
    """

    kind: Literal["vm"] = "vm"
    spec: VmSpec
    status: VmStatus = Field(default_factory=VmStatus)
    generation: int = 1
    reboot_generation: int = 0
    power_generation: int = 0
    force_stop: bool = False
    deleting: bool = False
