"""The QEMU driver's persisted per-VM handle: ``<state_dir>/vms/<name>/handle.json``.

A handle is everything a restarted agent needs to find and re-attach to a VM: the DriverVm
fields the agent stored (vm_id, epoch, spec, generations, message, extra), the VM's hardware
(uuid, machine, boot source, disks, VNC display), and the QEMU process it last launched (pid,
start time, QEMU version, accelerator). ``power`` is what the driver last made the VM (``running``
after a start, ``stopped`` after a stop): a VM whose QEMU is gone while ``power`` is ``running``
died without the driver stopping it, which the driver reports as ``crashed``.

The VM's run files (QMP and serial sockets, console log, pid file, QEMU's start-up log) live in
the same directory. ``save_handle`` writes atomically (a temporary file, fsync, then
``os.replace``): after a crash, of the agent or of the machine, the file holds the old handle or
the new one, never a torn one. Unlike the fake driver this one fsyncs, because a lost handle
means a running QEMU nobody manages.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.agent.drivers.qemu.cmdline import DirectKernelBoot, DiskConfig, Machine
from corral.errors import DriverError
from corral.model import VmSpec

__all__ = [
    "HANDLE_FILE",
    "VMS_DIR",
    "DiskLayers",
    "QemuHandle",
    "StoredBoot",
    "StoredDisk",
    "load_handles",
    "save_handle",
    "top_node",
]

VMS_DIR = "vms"
"""The subdirectory of ``state_dir`` with one directory per VM."""
HANDLE_FILE = "handle.json"
_FORMAT_VERSION = 1


class _Stored(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoredBoot(_Stored):
    """A boot source as recorded; checked again (files exist) at every start."""

    kernel: str
    initrd: str | None = None
    cmdline: str = ""

    @classmethod
    def of(cls, boot: DirectKernelBoot) -> StoredBoot:
        initrd = str(boot.initrd) if boot.initrd is not None else None
        return cls(kernel=str(boot.kernel), initrd=initrd, cmdline=boot.cmdline)


class StoredDisk(_Stored):
    """A disk as recorded; checked again (the image exists) at every start."""

    path: str
    format: Literal["qcow2", "raw"]
    read_only: bool = False
    id: str = ""
    slot: int | None = None

    @classmethod
    def of(cls, disk: DiskConfig, slot: int | None = None) -> StoredDisk:
        return cls(
            path=str(disk.path),
            format=disk.format,
            read_only=disk.read_only,
            id=disk.id,
            slot=disk.slot if slot is None else slot,
        )


class DiskLayers(_Stored):
    """Block nodes put on top of a disk while its QEMU (``pid``) runs: external overlays a
    linked clone froze the disk under (``layers.freeze``), oldest first. A new QEMU opens the
    whole chain from the files again, under ``disk<slot>``: entries of another pid are stale."""

    pid: int
    nodes: tuple[str, ...] = ()


class QemuHandle(BaseModel):
    """One VM's persisted handle (see the module docstring). Mutated only through
    ``model_copy(update=...)`` and saved after every change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = _FORMAT_VERSION
    name: str
    vm_id: str
    epoch: int
    spec: VmSpec
    applied_generation: int = 0
    reboot_generation: int = 0
    message: str = ""
    extra: dict[str, str] = Field(default_factory=dict)
    uuid: str
    machine: Machine = "q35"
    # None: the firmware boots the first disk.
    boot: StoredBoot | None
    disks: tuple[StoredDisk, ...] = ()
    vnc_display: int
    power: Literal["running", "stopped"] = "stopped"
    pid: int | None = None
    started_at: datetime | None = None
    qemu_version: str | None = None
    accel: str | None = None
    stop_message: str = Field(default="", description="why the VM last stopped, if not asked to")
    # Disk id -> the overlay nodes added live on top of it (see DiskLayers).
    disk_layers: dict[str, DiskLayers] = Field(default_factory=dict)

    def live_layers(self, disk: StoredDisk) -> tuple[str, ...]:
        """The overlay nodes on top of ``disk`` in the running QEMU (oldest first)."""
        entry = self.disk_layers.get(disk.id)
        if entry is None or self.pid is None or entry.pid != self.pid:
            return ()
        return entry.nodes


def top_node(handle: QemuHandle, index: int, disk: StoredDisk) -> str:
    """The QEMU block node the guest's disk writes to now: ``disk<slot>``, or the newest
    overlay put on top of it while this QEMU runs."""
    layers = handle.live_layers(disk)
    return layers[-1] if layers else f"disk{disk.slot if disk.slot is not None else index}"


def load_handles(vms_dir: Path) -> dict[str, QemuHandle]:
    """Every handle under ``vms_dir``, by VM name. Directories without a handle file (a
    ``define`` interrupted before its first write) are skipped; a corrupt handle, or one of an
    unknown format version, raises DriverError naming the file."""
    try:
        dirs = sorted(p for p in vms_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise DriverError(f"qemu driver: cannot list {vms_dir}: {exc}") from exc
    handles: dict[str, QemuHandle] = {}
    for vm_dir in dirs:
        path = vm_dir / HANDLE_FILE
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DriverError(f"qemu driver: cannot read {path}: {exc}") from exc
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != _FORMAT_VERSION:
                version = doc.get("version") if isinstance(doc, dict) else None
                raise ValueError(f"unsupported format version {version!r}")
            handle = QemuHandle.model_validate(doc)
            if handle.name != vm_dir.name:
                raise ValueError(f"it holds vm {handle.name!r}")
        except (ValueError, ValidationError) as exc:
            raise DriverError(f"qemu driver: corrupt handle file {path}: {exc}") from exc
        handles[handle.name] = handle
    return handles


def save_handle(vm_dir: Path, handle: QemuHandle) -> None:
    """Write ``handle`` to ``vm_dir/handle.json`` atomically and durably (see the module
    docstring); raises DriverError naming the file when it cannot."""
    path = vm_dir / HANDLE_FILE
    text = json.dumps(handle.model_dump(mode="json"), indent=1, sort_keys=True)
    try:
        vm_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{HANDLE_FILE}.", suffix=".tmp", dir=vm_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(vm_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a machine crash too
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise DriverError(f"qemu driver: cannot write {path}: {exc}") from exc
