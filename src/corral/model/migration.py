"""A live migration of one VM between two hosts: the record the leader's migration loop
advances (see ``corral.control.migrations`` for the protocol), and the pieces of it that travel
in assignments (``IncomingMigration``, ``OutgoingMigration``) and observations
(``MigrationReport``)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.model.common import ObjectMeta, Strict
from corral.model.node import HostCpu

__all__ = [
    "DEFAULT_MAX_DOWNTIME_MS",
    "FINAL_PHASES",
    "IncomingMigration",
    "Migration",
    "MigrationOptions",
    "MigrationPhase",
    "MigrationReport",
    "MigrationRequest",
    "MigrationSpec",
    "MigrationStatus",
    "OutgoingMigration",
    "ReportStatus",
]

DEFAULT_MAX_DOWNTIME_MS = 300
MigrationPhase = Literal[
    "pending",  # accepted; the leader has not acted yet
    "preparing",  # the target host starts an incoming QEMU (and NBD exports)
    "migrating",  # the source host copies disks (local pools) then RAM
    "switched-over",  # the guest runs on the target; the source's leftovers are being removed
    "rolling-back",  # cancelled or failed: the source keeps the guest, the target is cleaned
    "succeeded",
    "failed",
    "cancelled",
]
FINAL_PHASES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# What one host reports about its side of a migration.
ReportStatus = Literal[
    "preparing",  # target: starting the incoming QEMU
    "listening",  # target: waiting for the source
    "mirroring",  # source: copying local disks to the target's NBD exports
    "active",  # source: RAM being transferred
    "completed",  # source: QEMU finished (the guest runs on the target); target: guest running
    "cancelled",  # source: migration stopped, guest running here
    "failed",
]


class MigrationOptions(Strict):
    """The user's knobs (body of ``POST /vms/{name}/migrate``, minus ``target``)."""

    max_downtime_ms: int = Field(
        default=DEFAULT_MAX_DOWNTIME_MS,
        ge=1,
        le=60_000,
        description="the pause QEMU may take at switch-over; raised in steps if RAM does not "
        "converge",
    )
    max_downtime_cap_ms: int = Field(
        default=10_000, ge=1, le=600_000, description="how far the automatic raise may go"
    )
    bandwidth_mib_s: int | None = Field(
        default=None, ge=1, le=1_000_000, description="cap on migration traffic (none: no cap)"
    )
    timeout_s: int = Field(
        default=600, ge=5, le=86_400, description="give up (and roll back) after this long"
    )


class MigrationRequest(MigrationOptions):
    """Body of ``POST /api/v1/vms/{name}/migrate``."""

    target: str | None = Field(default=None, description="the host; none: the scheduler picks")


class MigrationReport(BaseModel):
    """One host's side of a migration, in its VM observation."""

    model_config = ConfigDict(extra="forbid")

    id: str
    role: Literal["source", "target"]
    status: ReportStatus
    message: str = ""
    # target: where it listens ("tcp:127.0.0.2:49152") and, with local disks, its NBD server.
    uri: str | None = None
    nbd_host: str | None = None
    nbd_port: int | None = None
    # target: the volumes' files on the target (volume name -> path).
    volumes: dict[str, str] = Field(default_factory=dict)
    # source: from QEMU's query-migrate / query-block-jobs.
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    dirty_pages_rate: int = 0
    expected_downtime_ms: int | None = None
    downtime_limit_ms: int | None = None
    disk_transferred_bytes: int = 0
    disk_total_bytes: int = 0
    downtime_ms: int | None = None
    total_time_ms: int | None = None


class IncomingMigration(BaseModel):
    """In the target's assignment: start an incoming QEMU for migration ``id``."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source: str
    # The source QEMU's machine type, accelerator and version: the target checks it can match.
    machine: str = "q35"
    accel: str | None = None
    qemu_version: str | None = None
    # Under KVM: the source host's CPU as its guests see it (the target must offer all of it).
    cpu: HostCpu | None = None
    # Volumes on host-local pools: the target exports blank copies over NBD.
    local_volumes: list[str] = Field(default_factory=list)
    # When the guest booted (on the source): the target keeps it (a migration is no reboot).
    started_at: datetime | None = None


class OutgoingMigration(BaseModel):
    """In the source's assignment: send the VM to ``uri`` (after mirroring local disks)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    target: str
    uri: str
    nbd_host: str | None = None
    nbd_port: int | None = None
    local_volumes: list[str] = Field(default_factory=list)
    max_downtime_ms: int = DEFAULT_MAX_DOWNTIME_MS
    max_downtime_cap_ms: int = 10_000
    bandwidth_mib_s: int | None = None


class MigrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm: str
    vm_id: str
    source: str
    target: str
    task: str
    options: MigrationOptions = Field(default_factory=MigrationOptions)
    # Volumes of the VM on host-local pools (mirrored); volumes on shared pools stay put.
    local_volumes: list[str] = Field(default_factory=list)
    # The source QEMU as its host reported it (checked by the target).
    machine: str = "q35"
    accel: str | None = None
    qemu_version: str | None = None
    # Under KVM: the CPU the guest found at the source (the target must offer all of it).
    cpu: HostCpu | None = None


class MigrationStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    phase: MigrationPhase = "pending"
    message: str = ""
    cancel_requested: bool = False
    # Why it is rolling back (cancel, failure, timeout): the task's final error.
    rollback_reason: str | None = None
    source: MigrationReport | None = None
    target: MigrationReport | None = None
    started_at: datetime | None = None
    # When the source was told to send (its assignment got ``outgoing``).
    outgoing_at: datetime | None = None
    switched_at: datetime | None = None
    finished_at: datetime | None = None


class Migration(ObjectMeta):
    """Stored at ``/corral/v1/migrations/<vm>``: the VM's current (or last) migration."""

    kind: Literal["migration"] = "migration"
    spec: MigrationSpec
    status: MigrationStatus = Field(default_factory=MigrationStatus)

    @property
    def final(self) -> bool:
        return self.status.phase in FINAL_PHASES
