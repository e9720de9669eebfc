"""The host side of snapshots, clones and templates: ``POST /api/v1/local/vms`` operations.

Servers call this on the host that holds a VM's QEMU and files (``control.hostcall``); each
operation runs here with the QEMU driver (``agent/drivers/qemu/snapshots.py``) and this host's
storage layout (``agent/storage.py``), and answers what it did as JSON.

Operations (``op``): ``snapshot-create`` (vm, tag, memory), ``snapshot-rollback`` (vm, tag,
with_memory, disks), ``snapshot-delete`` (vm, tag), ``copy-disk`` (source and target
``AssignedDisk``, linked, vm: the VM using the source, if any), ``protect`` (disk: made
read-only for good, a template's volume) and ``flatten`` (disk: a linked clone made standalone).

Linked clones of a VM and copies to other hosts (``service/clones.py`` calls them):
``link-clone`` (vm, disks: [{source, top, clones}]: each source file becomes a read-only base
under a new top file the VM moves onto, and each clone gets an overlay on the same base; see
``drivers/qemu/layers.py``), ``export-start`` (vm, disk: a read-only NBD export of it) and
``export-stop`` (id) on the source host, ``import-disk`` (target, source: host/port/export) on
the target host (``agent/disk_export.py``), and ``disk-info`` (disks: what ``qemu-img info``
says of each file: its internal snapshots with their saved VM state, and its allocation).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from corral.agent.disk_export import DiskExports, NbdSource, import_disk
from corral.agent.drivers import Driver, QemuDriver
from corral.agent.drivers.qemu.layers import FrozenDisk, create_overlay, freeze, virtual_size
from corral.agent.drivers.qemu.snapshots import qemu_img
from corral.agent.storage import HostStorage
from corral.errors import Conflict, DriverError, Malformed, Unavailable
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


_FILE_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,120}\.qcow2$")


def _vm(op: dict[str, Any]) -> str | None:
    vm = op.get("vm")
    return vm if isinstance(vm, str) and vm else None


async def run_vm_op(
    driver: Driver,
    storage: HostStorage,
    op: dict[str, Any],
    *,
    exports: DiskExports | None = None,
) -> dict[str, Any]:
    """Run one operation; raises Malformed for a bad document, DriverError / Conflict /
    ValidationFailed from the hypervisor."""
    kind = op.get("op")
    if kind == "disk-info":
        disks = op.get("disks")
        if not isinstance(disks, list):
            raise Malformed("disks: must be a list of disks")
        return {"disks": [await _disk_info(storage, _disk({"d": d}, "d")) for d in disks]}
    if kind == "export-stop":
        if exports is None:
            return {"id": op.get("id"), "stopped": False}
        return await exports.stop(driver, _str(op, "id"))
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
    if kind == "link-clone":
        return await _link_clone(driver, storage, op)
    if kind == "export-start":
        if exports is None:
            raise Unavailable("this host cannot export disks (no address to bind to)")
        disk = _disk(op, "disk")
        return await exports.start(driver, _vm(op), storage.volume_path(disk))
    if kind == "import-disk":
        target = _disk(op, "target")
        origin = op.get("source")
        if not isinstance(origin, dict):
            raise Malformed("source: must be {host, port, export}")
        host, port, name = origin.get("host"), origin.get("port"), origin.get("export")
        if not isinstance(host, str) or not re.fullmatch(r"[0-9a-fA-F.:]+", host):
            raise Malformed("source.host: must be an IP address")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise Malformed("source.port: must be a TCP port")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{8,64}", name):
            raise Malformed("source.export: must be an export name")
        dst = storage.volume_path(target)
        if dst.exists():
            raise Conflict(f"volume {target.volume}: {dst} exists already")
        storage.check_capacity(target)
        await import_disk(NbdSource(host, port, name), dst, target.size_gib)
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
        "op: must be snapshot-create, snapshot-rollback, snapshot-delete, copy-disk, protect, "
        f"flatten, link-clone, export-start, export-stop, import-disk or disk-info, not {kind!r}"
    )


async def _link_clone(driver: Driver, storage: HostStorage, op: dict[str, Any]) -> dict[str, Any]:
    """Freeze each source file under a new top and give each clone an overlay on it: the clone
    files first (nothing uses them yet), then the switch, which is all or nothing."""
    items = op.get("disks")
    if not isinstance(items, list) or not items:
        raise Malformed("disks: must be a non-empty list of {source, top, clones}")
    plan: list[tuple[FrozenDisk, list[tuple[Path, int]]]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise Malformed(f"disks.{i}: must be an object")
        source = _disk(item, "source")
        top = item.get("top")
        if not isinstance(top, str) or not _FILE_NAME.match(top):
            raise Malformed(f"disks.{i}.top: must be a file name ending in .qcow2")
        base = storage.volume_path(source)
        if not base.is_file():
            raise Conflict(f"volume {source.volume}: its file {base} is not on this host")
        clones = item.get("clones")
        if not isinstance(clones, list):
            raise Malformed(f"disks.{i}.clones: must be a list of disks")
        targets = []
        for clone in (_disk({"d": c}, "d") for c in clones):
            targets.append((storage.volume_path(clone), clone.size_gib))
        plan.append((FrozenDisk(base=base, top=base.with_name(top)), targets))
    qemu = driver if isinstance(driver, QemuDriver) else None
    if qemu is None and _vm(op) is not None:
        raise Conflict(f"the {driver.name} driver keeps no disk files: linked clones need qemu")
    made: list[Path] = []
    try:
        for frozen, targets in plan:
            size = await virtual_size(frozen.base)
            for path, size_gib in targets:
                await create_overlay(frozen.base, path, max(size, size_gib * 1024**3))
                made.append(path)
        state = await freeze(qemu, _vm(op), [frozen for frozen, _ in plan])
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        raise
    return {
        "vm_state": state,
        "disks": [
            {
                "base": str(frozen.base),
                "top": str(frozen.top),
                "clones": [str(path) for path, _ in targets],
                "allocated_bytes": [storage.allocated_bytes(path) for path, _ in targets],
            }
            for frozen, targets in plan
        ],
    }


async def _disk_info(storage: HostStorage, disk: AssignedDisk) -> dict[str, Any]:
    """What QEMU reports of a volume's file: its internal snapshots (tag, saved VM state size,
    date) and how much of the file is allocated; read beside a running QEMU (``-U``)."""
    path = storage.volume_path(disk)
    if not path.is_file():
        return {"volume": disk.volume, "path": str(path), "present": False, "snapshots": []}
    doc = json.loads(await qemu_img("info", "--output=json", "-U", "-f", "qcow2", str(path)))
    return {
        "volume": disk.volume,
        "path": str(path),
        "present": True,
        "allocated_bytes": doc.get("actual-size"),
        "virtual_size_bytes": doc.get("virtual-size"),
        "backing_file": doc.get("backing-filename"),
        "snapshots": [
            {
                "name": str(s.get("name")),
                "vm_state_bytes": int(s.get("vm-state-size") or 0),
                "date_sec": s.get("date-sec"),
            }
            for s in doc.get("snapshots") or []
        ],
    }
