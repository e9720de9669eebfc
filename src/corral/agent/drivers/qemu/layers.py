"""External qcow2 layers: freezing a VM's disks into read-only bases that linked clones share.

``freeze`` puts a new, empty qcow2 overlay on top of each disk file (its backing file: the old
file) and moves the VM onto the overlays, so the old files are never written again and linked
clones can use them as their backing files too:

- **running or paused** (a QEMU holds the files): each overlay is opened with ``blockdev-add``
  (no backing yet) and one QMP ``transaction`` of ``blockdev-snapshot`` actions puts all of them
  on top of the VM's disks at the same instant. The guest keeps running; QEMU drops its write
  permission on the old files. The new node names are recorded in the handle
  (``QemuHandle.disk_layers``) for as long as this QEMU runs; a new QEMU opens the chain from
  the files under the usual ``disk<slot>`` names;
- **stopped** (or not defined here): only the files and the handle's disk paths change.

The old files are made read-only (mode 0444) afterwards. Everything runs under the VM's driver
lock; a failure before the switch removes the overlays again and leaves the VM as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from corral.agent.drivers.qemu.handle import DiskLayers, top_node
from corral.agent.drivers.qemu.snapshots import qemu_img
from corral.errors import Conflict, DriverError

if TYPE_CHECKING:
    from corral.agent.drivers.qemu.driver import QemuDriver

__all__ = ["FrozenDisk", "create_overlay", "freeze", "virtual_size"]


@dataclass(frozen=True)
class FrozenDisk:
    """One disk moved onto a new top layer: ``base`` is never written again."""

    base: Path
    top: Path


async def virtual_size(path: Path) -> int:
    """The virtual size of a qcow2 file (read beside a QEMU that may hold it: ``-U``)."""
    doc = json.loads(await qemu_img("info", "--output=json", "-U", "-f", "qcow2", str(path)))
    size = doc.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise DriverError(f"qemu-img info {path}: no virtual size")
    return size


def _new_file_at(path: Path) -> None:
    """Refuse to make a file where one exists (qemu-img create would truncate it)."""
    if path.exists() or path.is_symlink():
        raise Conflict(f"{path} exists already")
    path.parent.mkdir(parents=True, exist_ok=True)


async def create_overlay(base: Path, top: Path, size_bytes: int) -> None:
    """A new empty qcow2 ``top`` whose backing file is ``base`` (qcow2). ``-u``: ``base`` is
    not opened (a running QEMU may hold its write lock until the switch)."""
    _new_file_at(top)
    args = ["create", "-q", "-f", "qcow2", "-u", "-b", str(base), "-F", "qcow2"]
    await qemu_img(*args, str(top), str(size_bytes))


async def freeze(driver: QemuDriver | None, vm: str | None, disks: Sequence[FrozenDisk]) -> str:
    """Move ``vm`` (None: no VM uses the files) from each ``base`` onto its new ``top`` (see the
    module docstring); the VM's state while it was done (``running``, ``stopped``, ...), or
    ``none``. Raises Conflict when a base is not one of the VM's disks or a top exists."""
    made: list[Path] = []
    try:
        for disk in disks:
            await create_overlay(disk.base, disk.top, await virtual_size(disk.base))
            made.append(disk.top)
        state = "none"
        if driver is not None and vm is not None and vm in driver._handles:
            state = await _switch(driver, vm, disks)
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        raise
    for disk in disks:
        try:
            os.chmod(disk.base, 0o444)
        except OSError as exc:
            raise DriverError(f"cannot make {disk.base} read-only: {exc}") from exc
    return state


async def _switch(driver: QemuDriver, vm: str, disks: Sequence[FrozenDisk]) -> str:
    async with driver._lock(vm):
        handle = driver._get(vm)
        by_path = {d.path: (i, d) for i, d in enumerate(handle.disks)}
        missing = [str(d.base) for d in disks if str(d.base) not in by_path]
        if missing:
            raise Conflict(
                f"vm {vm} does not use {', '.join(missing)} on this host (its disks: "
                f"{', '.join(d.path for d in handle.disks) or 'none'})"
            )
        runtime = await driver._runtime(handle)
        layers = dict(handle.disk_layers)
        if runtime.status is not None:
            assert handle.pid is not None
            session = await driver._session(handle)
            added: list[str] = []
            actions = []
            try:
                for disk in disks:
                    index, stored = by_path[str(disk.base)]
                    current = handle.live_layers(stored)
                    slot = stored.slot if stored.slot is not None else index
                    node = f"disk{slot}-layer{len(current) + 1}"
                    await session.execute(
                        "blockdev-add",
                        {
                            "driver": "qcow2",
                            "node-name": node,
                            "file": {"driver": "file", "filename": str(disk.top)},
                            "backing": None,
                        },
                    )
                    added.append(node)
                    actions.append(
                        {
                            "type": "blockdev-snapshot",
                            "data": {"node": top_node(handle, index, stored), "overlay": node},
                        }
                    )
                    layers[stored.id] = DiskLayers(pid=handle.pid, nodes=(*current, node))
                await session.execute("transaction", {"actions": actions})
            except BaseException:
                for node in added:
                    with contextlib.suppress(DriverError):
                        await session.execute("blockdev-del", {"node-name": node})
                raise
        tops = {str(d.base): str(d.top) for d in disks}
        new_disks = tuple(
            d.model_copy(update={"path": tops[d.path]}) if d.path in tops else d
            for d in handle.disks
        )
        driver._patch(vm, disks=new_disks, disk_layers=layers)
        return runtime.state
