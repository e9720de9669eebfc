"""Internal qcow2 snapshots of a VM's disks, with or without its memory, and disk copies.

A snapshot lives inside every qcow2 file of the VM under one tag (``corral volume`` files are
always qcow2). How each operation is done depends on whether the VM has a QEMU now:

- **running or paused** (QEMU holds the files): with memory, the QMP ``snapshot-save`` job
  writes the RAM and device state into the first disk (``vmstate``) and snapshots every disk
  at the same instant; disk only, the vCPUs are frozen while ``blockdev-snapshot-internal-sync``
  runs on each disk, so all disks show the same instant. Rollback of a snapshot with memory is
  the ``snapshot-load`` job: disks and RAM go back and the guest resumes where it was (a VM that
  was running runs on). A disk-only snapshot cannot be applied under a live QEMU: stop first.
  Delete is ``blockdev-snapshot-delete-internal-sync`` on each disk.
- **stopped**: ``qemu-img snapshot -c/-a/-d`` on each file (a memory snapshot cannot be taken:
  there is no memory; applying one rolls back the disks and the guest boots afresh).

Every operation holds the VM's driver lock, so a start, stop or resume of the same VM waits
until it is done. Copies of a disk (``copy_disk``) read a temporary internal snapshot when the
VM runs, so the VM keeps running and the copy is of one instant.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.agent.drivers.qemu.handle import top_node
from corral.errors import Conflict, DriverError, ValidationFailed

if TYPE_CHECKING:
    from corral.agent.drivers.qemu.driver import QemuDriver
    from corral.agent.drivers.qemu.handle import StoredDisk
    from corral.agent.drivers.qemu.qmp import QmpSession

__all__ = [
    "HeldSnapshot",
    "SnapshotResult",
    "copy_disk",
    "create",
    "delete",
    "drop_temporary_snapshot",
    "qemu_img",
    "rollback",
    "take_temporary_snapshot",
]

_JOB_TIMEOUT_S = 600.0
# snapshot-save blocks QEMU's main loop while it writes the RAM: QMP answers only afterwards.
_JOB_POLL_TIMEOUT_S = 300.0
_QEMU_IMG_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class SnapshotResult:
    """What an operation did: the VM's state while it ran, and what the first disk reports."""

    vm_state: str
    with_memory: bool
    vm_state_bytes: int
    disks: dict[str, str]
    # What QEMU reports as allocated in the disk files (``actual-size``) just afterwards.
    disk_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "vm_state": self.vm_state,
            "with_memory": self.with_memory,
            "vm_state_bytes": self.vm_state_bytes,
            "disks": dict(self.disks),
            "disk_bytes": self.disk_bytes,
        }


async def qemu_img(*args: str, binary: str = "qemu-img") -> str:
    """Run ``qemu-img ARGS`` (no shell); its stdout, or DriverError with its own words."""
    try:
        proc = await asyncio.create_subprocess_exec(
            binary,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise DriverError(f"cannot run {binary}: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _QEMU_IMG_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DriverError(
            f"qemu-img {args[0]} took longer than {_QEMU_IMG_TIMEOUT_S:g} s"
        ) from None
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
        raise DriverError(f"qemu-img {' '.join(args[:2])} failed: {text}")
    return out.decode(errors="replace")


async def _allocated(path: str) -> int:
    """What QEMU reports as allocated for a qcow2 file (``actual-size``; read with ``-U``)."""
    doc = json.loads(await qemu_img("info", "--output=json", "-U", "-f", "qcow2", path))
    return int(doc.get("actual-size") or 0)


async def _tags(path: str) -> dict[str, int]:
    """The internal snapshots of a qcow2 file: tag -> size of its saved VM state (bytes).
    ``-U``: the file may be open by a running QEMU (reading its header is safe)."""
    doc = json.loads(await qemu_img("info", "--output=json", "-U", "-f", "qcow2", path))
    return {
        str(s.get("name")): int(s.get("vm-state-size") or 0) for s in doc.get("snapshots") or []
    }


def _image_opts(path: str) -> str:
    """``qemu-img snapshot`` takes no ``-f``: the format goes explicitly in image options."""
    return f"driver=qcow2,file.driver=file,file.filename={path.replace(',', ',,')}"


async def _snapshot_file(flag: str, tag: str, path: str) -> None:
    await qemu_img("snapshot", "-q", "--image-opts", flag, tag, _image_opts(path))


def _qcow2(name: str, disks: Sequence[StoredDisk]) -> None:
    if not disks:
        raise ValidationFailed.one("vm", "disks", f"vm {name} has no disks to snapshot")
    raw = [d.id or d.path for d in disks if d.format != "qcow2"]
    if raw:
        raise ValidationFailed.one(
            "vm", "qcow2", f"vm {name}: disks {', '.join(raw)} are raw; snapshots need qcow2"
        )


async def _run_job(session: QmpSession, command: str, args: dict[str, Any]) -> None:
    """Start a QMP job, wait until it concluded, dismiss it; DriverError with QEMU's error."""
    job = f"corral-{command}-{secrets.token_hex(3)}"
    await session.execute(command, {"job-id": job, **args})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _JOB_TIMEOUT_S
    while True:
        jobs = await session.execute("query-jobs", timeout_s=_JOB_POLL_TIMEOUT_S)
        mine = next((j for j in jobs or [] if j.get("id") == job), None)  # type: ignore[attr-defined]
        if mine is None:
            raise DriverError(f"qemu: job {job} ({command}) vanished")
        if mine.get("status") == "concluded":
            await session.execute("job-dismiss", {"id": job})
            if mine.get("error"):
                raise DriverError(f"qemu: {command} failed: {mine['error']}")
            return
        if loop.time() >= deadline:
            raise DriverError(f"qemu: {command} did not finish within {_JOB_TIMEOUT_S:g} s")
        await asyncio.sleep(0.1)


async def create(driver: QemuDriver, name: str, tag: str, memory: bool | None) -> SnapshotResult:
    """Take snapshot ``tag`` of every disk of ``name`` (and its RAM with ``memory``; None: with
    memory when the VM runs). Raises Conflict when the tag exists, ValidationFailed for a memory
    snapshot of a stopped VM or raw disks."""
    async with driver._lock(name):
        handle = driver._get(name)
        disks = handle.disks
        _qcow2(name, disks)
        runtime = await driver._runtime(handle)
        live = runtime.status is not None
        if memory and not live:
            raise ValidationFailed.one(
                "memory",
                "running",
                f"vm {name} is {runtime.state}: there is no memory to save; take a disk-only "
                "snapshot (--no-memory) or start it first",
            )
        with_memory = live if memory is None else memory
        for d in disks:
            if tag in await _tags(d.path):
                raise Conflict(f"vm {name}: disk {d.id or d.path} already has snapshot {tag!r}")
        if live:
            session = await driver._session(handle)
            nodes = [top_node(handle, i, d) for i, d in enumerate(disks)]
            if with_memory:
                await _run_job(
                    session, "snapshot-save", {"tag": tag, "vmstate": nodes[0], "devices": nodes}
                )
            else:
                was_running = await session.status() == "running"
                if was_running:
                    await session.stop()
                try:
                    for node in nodes:
                        await session.execute(
                            "blockdev-snapshot-internal-sync", {"device": node, "name": tag}
                        )
                finally:
                    if was_running:
                        await session.cont()
        else:
            for d in disks:
                await _snapshot_file("-c", tag, d.path)
        size = (await _tags(disks[0].path)).get(tag, 0)
        allocated = sum([await _allocated(d.path) for d in disks])
        return SnapshotResult(
            runtime.state,
            with_memory,
            size,
            {d.id or str(i): d.path for i, d in enumerate(disks)},
            allocated,
        )


async def rollback(
    driver: QemuDriver, name: str, tag: str, with_memory: bool, disk_ids: Sequence[str]
) -> SnapshotResult:
    """Put the VM's disks (``disk_ids``: those the snapshot covers) back to ``tag``; with a
    live QEMU and a memory snapshot, its RAM too (the guest resumes from there). Raises
    Conflict for a disk-only snapshot under a live QEMU, or when a covered disk is gone."""
    async with driver._lock(name):
        handle = driver._get(name)
        by_id = {d.id: (i, d) for i, d in enumerate(handle.disks)}
        missing = [d for d in disk_ids if d not in by_id]
        if missing:
            raise Conflict(
                f"vm {name}: snapshot {tag!r} covers disks {', '.join(missing)}, which are no "
                "longer attached; attach them again to roll back"
            )
        chosen = [by_id[d] for d in disk_ids]
        runtime = await driver._runtime(handle)
        if runtime.status is not None:
            if not with_memory:
                raise Conflict(
                    f"vm {name} is {runtime.state} and snapshot {tag!r} holds no memory: a "
                    f"running guest's disks cannot be swapped under it; stop it first "
                    f"(`corral vm stop {name}`), then roll back"
                )
            session = await driver._session(handle)
            nodes = [top_node(handle, i, d) for i, d in chosen]
            await _run_job(
                session, "snapshot-load", {"tag": tag, "vmstate": nodes[0], "devices": nodes}
            )
        else:
            for _, d in chosen:
                await _snapshot_file("-a", tag, d.path)
        return SnapshotResult(
            runtime.state,
            with_memory and runtime.status is not None,
            0,
            {d.id: d.path for _, d in chosen},
        )


async def delete(driver: QemuDriver, name: str, tag: str) -> SnapshotResult:
    """Remove ``tag`` from every disk of the VM that has it (idempotent)."""
    async with driver._lock(name):
        handle = driver._get(name)
        runtime = await driver._runtime(handle)
        session = await driver._session(handle) if runtime.status is not None else None
        done: dict[str, str] = {}
        for i, d in enumerate(handle.disks):
            if d.format != "qcow2" or tag not in await _tags(d.path):
                continue
            if session is not None:
                await session.execute(
                    "blockdev-snapshot-delete-internal-sync",
                    {"device": top_node(handle, i, d), "name": tag},
                    timeout_s=_JOB_POLL_TIMEOUT_S,
                )
            else:
                await _snapshot_file("-d", tag, d.path)
            done[d.id or str(i)] = d.path
        return SnapshotResult(runtime.state, False, 0, done)


async def copy_disk(
    driver: QemuDriver | None,
    vm: str | None,
    source: Path,
    target: Path,
    *,
    linked: bool,
    size_gib: int | None = None,
) -> None:
    """Make ``target`` (a new qcow2 file) from ``source``: a linked clone (a thin overlay whose
    backing file is ``source``, which must never be written again) or a full, flattened copy.
    When ``vm`` has a QEMU holding ``source``, the full copy is read from a temporary internal
    snapshot, so the VM keeps running and the copy is of one instant. The file appears under
    its final name only once complete."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if linked:
            args = ["create", "-q", "-f", "qcow2", "-b", str(source), "-F", "qcow2", str(tmp)]
            await qemu_img(*args, *([f"{size_gib}G"] if size_gib else []))
        else:
            await _full_copy(driver, vm, source, tmp)
            if size_gib:
                await qemu_img("resize", "-q", "-f", "qcow2", str(tmp), f"{size_gib}G")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


async def _full_copy(driver: QemuDriver | None, vm: str | None, source: Path, tmp: Path) -> None:
    convert = ["convert", "-q", "-f", "qcow2", "-O", "qcow2"]
    held = await take_temporary_snapshot(driver, vm, source)
    if held is None:
        await qemu_img(*convert, str(source), str(tmp))
        return
    try:
        # The snapshot's clusters never change while it exists: reading them beside the
        # running QEMU (-U) is safe, and the VM is not held up.
        await qemu_img(*convert, "-U", "-l", f"snapshot.name={held.tag}", str(source), str(tmp))
    finally:
        await drop_temporary_snapshot(driver, vm, source, held)


@dataclass(frozen=True)
class HeldSnapshot:
    """A temporary internal snapshot of a disk a running QEMU holds (see
    ``take_temporary_snapshot``)."""

    tag: str
    node: str


async def take_temporary_snapshot(
    driver: QemuDriver | None, vm: str | None, source: Path
) -> HeldSnapshot | None:
    """When ``vm``'s QEMU here has ``source`` open: a new internal snapshot of it, whose
    clusters never change while it exists (read it with ``-U -l snapshot.name=TAG``); None
    when no QEMU holds the file (read the file itself, under the usual locks)."""
    if driver is None or vm is None or vm not in driver._handles:
        return None
    async with driver._lock(vm):
        handle = driver._get(vm)
        runtime = await driver._runtime(handle)
        index = next((i for i, d in enumerate(handle.disks) if d.path == str(source)), None)
        if runtime.status is None or index is None:
            return None
        session = await driver._session(handle)
        node = top_node(handle, index, handle.disks[index])
        tag = f"corral-copy-{secrets.token_hex(4)}"
        await session.execute("blockdev-snapshot-internal-sync", {"device": node, "name": tag})
        return HeldSnapshot(tag, node)


async def drop_temporary_snapshot(
    driver: QemuDriver | None, vm: str | None, source: Path, held: HeldSnapshot
) -> None:
    """Remove a snapshot ``take_temporary_snapshot`` made (through QEMU if it still runs)."""
    if driver is None or vm is None:
        return
    async with driver._lock(vm):
        handle = driver._handles.get(vm)
        if handle is not None and (await driver._runtime(handle)).status is not None:
            session = await driver._session(handle)
            await session.execute(
                "blockdev-snapshot-delete-internal-sync", {"device": held.node, "name": held.tag}
            )
        else:
            await _snapshot_file("-d", held.tag, str(source))
