"""The hypervisor contract every driver fulfils (``qemu``, ``fake``).

Drivers are picked from an explicit dict in ``corral.agent.drivers.DRIVERS``. Every method is
async, raises ``corral.errors.DriverError`` (translated at this boundary) on failure, and is
idempotent where the docstring says so. A driver persists enough about each VM (a handle) to
re-attach after the agent restarts: ``recover`` returns the VMs still alive, untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from corral.model import HostCpu, VmSpec

__all__ = ["Driver", "DriverBoot", "DriverDisk", "DriverVm", "RuntimeState"]

RuntimeState = Literal["running", "stopped", "crashed", "paused"]


@dataclass(frozen=True)
class DriverDisk:
    """A disk as the hypervisor gets it: the volume's name (``id``), file and format."""

    id: str
    path: str
    format: Literal["qcow2", "raw"] = "qcow2"
    read_only: bool = False


@dataclass(frozen=True)
class DriverBoot:
    """Direct kernel boot (``kernel`` set), or from the first disk (``kernel`` None)."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""


@dataclass
class DriverVm:
    """A VM as the hypervisor sees it."""

    name: str
    vm_id: str
    epoch: int
    spec: VmSpec
    state: RuntimeState
    started_at: datetime | None = None
    # Generation of the intent last applied (kept in the handle so a restart remembers it).
    applied_generation: int = 0
    reboot_generation: int = 0
    message: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # Disks in order (the first one boots); None boot: the driver's default boot source.
    disks: tuple[DriverDisk, ...] = ()
    boot: DriverBoot | None = None


class Driver(Protocol):
    name: str

    def watch(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(vm name)`` whenever a VM's state may have changed on its own (the
        guest powered off, reset or paused; its process died), so the agent looks at once."""

    async def fingerprint(self) -> dict[str, str]:
        """What this hypervisor offers (version, accelerator); goes into the node inventory."""

    async def host_cpu(self) -> HostCpu | None:
        """The CPU guests see under KVM (``-cpu host``) on this host, for live-migration
        checks; None when guests do not run under KVM here."""

    async def recover(self) -> list[DriverVm]:
        """Re-attach to every VM a previous agent left: running ones stay running."""

    async def define(self, vm: DriverVm) -> DriverVm:
        """Create the VM (stopped) with its spec. Idempotent for the same name and vm_id."""

    async def start(self, name: str) -> DriverVm:
        """Boot a defined VM. Idempotent when already running."""

    async def stop(self, name: str, *, force: bool = False, timeout_s: float = 60.0) -> DriverVm:
        """Graceful shutdown, then power off after ``timeout_s``; ``force`` powers off now."""

    async def reboot(self, name: str) -> DriverVm:
        """Reset a running VM (its ``started_at`` changes)."""

    async def pause(self, name: str) -> DriverVm:
        """Freeze a running VM's vCPUs (state ``paused``, ``started_at`` kept). Idempotent when
        paused; raises DriverError when the VM is neither running nor paused."""

    async def resume(self, name: str) -> DriverVm:
        """Let a paused VM run on from where it was. Idempotent when running; raises
        DriverError when the VM is neither running nor paused."""

    async def update(self, name: str, vm: DriverVm) -> DriverVm:
        """Store a new spec / generation; hardware changes take effect at the next start."""

    async def attach_disk(self, name: str, disk: DriverDisk) -> DriverVm:
        """Add a disk: hot-plugged into a running VM, or recorded for the next start.
        Idempotent for a disk already attached."""

    async def detach_disk(self, name: str, disk_id: str) -> DriverVm:
        """Remove a disk: hot-unplugged from a running VM (the guest must let it go), or
        dropped from the definition. Idempotent for a disk not attached."""

    async def destroy(self, name: str) -> None:
        """Stop the VM if needed and remove it and its handle. Idempotent."""

    async def inspect(self, name: str) -> DriverVm | None:
        """The VM's current state, or None when it is not defined here."""

    async def list(self) -> list[DriverVm]:
        """Every VM defined on this host."""

    async def close(self) -> None:
        """Release driver resources; VMs keep running."""
