"""What the leader asks one node to run, and what that node reports back."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.model.vm import VmSpec

__all__ = ["Assignment", "ObservedState", "VmObservation"]

ObservedState = Literal["starting", "running", "paused", "stopping", "stopped", "crashed", "failed"]


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
