"""The host side of snapshots, clones and templates: ``POST /api/v1/local/vms`` operations.

Servers call this on the host that holds a VM's QEMU and files (``control.hostcall``); each
operation runs here with the QEMU driver (``agent/drivers/qemu/snapshots.py``) and this host's
storage layout (``agent/storage.py``), and answers what it did as JSON.

Operations (``op``): ``snapshot-create`` (vm, tag, memory), ``snapshot-rollback`` (vm, tag,
with_memory, disks), ``snapshot-delete`` (vm, tag), ``copy-disk`` (source and target
``AssignedDisk``, linked, vm: the VM using the source, if any), ``protect`` (disk: made
read-only for good, a template's volume) and ``flatten`` (disk: a linked clone made standalone).
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import ValidationError

from corral.agent.drivers import Driver, QemuDriver
from corral.agent.drivers.qemu.snapshots import qemu_img
from corral.agent.storage import HostStorage
from corral.errors import Conflict, DriverError, Malformed
from corral.model.assignment import AssignedDisk

__all__ = ["run_vm_op"]


def _str(op: dict[str, Any], key: str) -> str:
    value = op.get(key)
    if not isinstance(value, str) or not value:
        raise Malformed(f"{key}: required (a string)")
    return value


def _disk(op: dict[str, Any], key: str) -> AssignedDisk:
    try:
        return AssignedDisk.model_validate(op.get(key))
    except ValidationError as exc:
        raise Malformed(f"{key}: {exc}") from None


async def run_vm_op(driver: Driver, storage: HostStorage, op: dict[str, Any]) -> dict[str, Any]:
    """Run one operation; raises Malformed for a bad document, DriverError / Conflict /
    ValidationFailed from the hypervisor."""
    kind = op.get("op")
    if kind == "protect":
        path = storage.volume_path(_disk(op, "disk"))
        try:
            os.chmod(path, 0o444)
        except OSError as exc:
            raise DriverError(f"cannot make {path} read-only: {exc}") from exc
        return {"path": str(path), "read_only": True}
    if kind == "flatten":
        path = storage.volume_path(_disk(op, "disk"))
        # Safe mode (no -u): the backing file's data is copied in before the link is dropped.
        await qemu_img("rebase", "-q", "-f", "qcow2", "-b", "", str(path))
        return {"path": str(path), "standalone": True}
    if not isinstance(driver, QemuDriver):
        raise Conflict(f"the {driver.name} driver keeps no disk files: snapshots need qemu")
    if kind == "copy-disk":
        source, target = _disk(op, "source"), _disk(op, "target")
        src, dst = storage.volume_path(source), storage.volume_path(target)
        if not src.is_file():
            raise Conflict(f"volume {source.volume}: its file {src} is not on this host")
        if dst.exists():
            raise Conflict(f"volume {target.volume}: {dst} exists already")
        vm = op.get("vm") if isinstance(op.get("vm"), str) else None
        linked = op.get("linked") is True
        storage.check_capacity(target)
        await driver.copy_disk(vm, src, dst, linked=linked, size_gib=target.size_gib)
        return {"path": str(dst), "allocated_bytes": storage.allocated_bytes(dst)}
    vm, tag = _str(op, "vm"), _str(op, "tag")
    if kind == "snapshot-create":
        memory = op.get("memory")
        if memory is not None and not isinstance(memory, bool):
            raise Malformed("memory: must be true, false or null")
        return (await driver.snapshot_create(vm, tag, memory=memory)).as_dict()
    if kind == "snapshot-rollback":
        disks = op.get("disks")
        if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks):
            raise Malformed("disks: must be a list of volume names")
        with_memory = op.get("with_memory") is True
        return (
            await driver.snapshot_rollback(vm, tag, with_memory=with_memory, disks=disks)
        ).as_dict()
    if kind == "snapshot-delete":
        return (await driver.snapshot_delete(vm, tag)).as_dict()
    raise Malformed(
        "op: must be snapshot-create, snapshot-rollback, snapshot-delete, copy-disk or protect, "
        f"not {kind!r}"
    )
