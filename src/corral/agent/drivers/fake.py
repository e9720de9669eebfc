"""The ``fake`` driver: an in-memory hypervisor whose VM table survives agent restarts.

It is for logic tests and for simulating many hosts in one process. Nothing is booted: a VM is
a row in a table. Like a real hypervisor's per-VM handle, each VM is persisted as its own file,
``<state_dir>/vms/<name>.json``, rewritten after every change to that VM and removed by
``destroy``, so an operation costs O(1) however many VMs the host has. A file is written
atomically (a temporary file in the same directory, then ``os.replace``), so a reader, or a
driver restarted after the agent process died, sees the old file or the new one, never a torn
one. There is deliberately no fsync: this is a simulator, and surviving a process crash is what
it models; a machine crash may lose recent changes (or leave a file corrupt, which ``_load``
reports as a DriverError naming it). A new ``FakeDriver`` over the same directory models an
agent restart: ``recover()`` returns the same VMs, still running, with the same ``started_at``
(running VMs are re-attached, never restarted).

Timings and failures are injectable: ``start_delay_s`` / ``stop_delay_s`` make start and
graceful stop take time, ``fail_start`` is an fnmatch glob of VM names whose start fails,
``inject_crash(name)`` turns a running VM ``crashed`` and ``inject_poweroff(name)`` makes its
guest power itself off.
"""

from __future__ import annotations

import asyncio
import builtins
import fnmatch
import json
import os
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from corral import __version__
from corral.agent.drivers.base import DriverDisk, DriverVm, RuntimeState
from corral.errors import DriverError
from corral.model import HostCpu, VmSpec

__all__ = ["HANDLE_DIR", "FakeDriver"]

HANDLE_DIR = "vms"
"""The subdirectory of ``state_dir`` holding one ``<name>.json`` handle file per VM."""
_FORMAT_VERSION = 1
_HANDLE_SUFFIX = ".json"
_RUNTIME_STATES: frozenset[str] = frozenset(get_args(RuntimeState))


def _copy(vm: DriverVm) -> DriverVm:
    """A copy that shares nothing mutable with ``vm`` (callers must not edit the table)."""
    # A spec holds only scalars and the labels dict: copying that dict is a deep copy, and far
    # cheaper than pydantic's generic deepcopy when a host lists thousands of VMs.
    spec = vm.spec.model_copy(update={"labels": dict(vm.spec.labels)})
    return replace(vm, spec=spec, extra=dict(vm.extra))


def _to_json(vm: DriverVm) -> dict[str, Any]:
    return {
        "name": vm.name,
        "vm_id": vm.vm_id,
        "epoch": vm.epoch,
        "spec": vm.spec.model_dump(mode="json"),
        "state": vm.state,
        "started_at": vm.started_at.isoformat() if vm.started_at else None,
        "applied_generation": vm.applied_generation,
        "reboot_generation": vm.reboot_generation,
        "message": vm.message,
        "extra": dict(vm.extra),
        "disks": [asdict(d) for d in vm.disks],
    }


def _from_json(row: dict[str, Any]) -> DriverVm:
    """Parse one persisted row; raises KeyError, TypeError or ValueError when it is malformed."""
    state = row["state"]
    if state not in _RUNTIME_STATES:
        raise ValueError(f"unknown state {state!r}")
    started_at = row.get("started_at")
    return DriverVm(
        name=str(row["name"]),
        vm_id=str(row["vm_id"]),
        epoch=int(row["epoch"]),
        spec=VmSpec.model_validate(row["spec"]),
        state=state,
        started_at=datetime.fromisoformat(started_at) if started_at else None,
        applied_generation=int(row.get("applied_generation", 0)),
        reboot_generation=int(row.get("reboot_generation", 0)),
        message=str(row.get("message", "")),
        extra={str(k): str(v) for k, v in dict(row.get("extra", {})).items()},
        disks=tuple(DriverDisk(**d) for d in row.get("disks", [])),
    )


class FakeDriver:
    """An in-memory hypervisor with a persisted VM table (see the module docstring).

    Every method raises ``DriverError`` for a VM that is not defined (except ``destroy`` and
    ``inspect``, which are idempotent) and when a handle file cannot be read or written.
    """

    name: str = "fake"

    def __init__(
        self,
        state_dir: Path,
        *,
        start_delay_s: float = 0.0,
        stop_delay_s: float = 0.0,
        fail_start: str = "",
    ) -> None:
        """Open (or create) the VM table in ``state_dir``; raises DriverError naming the handle
        file that is corrupt or of an unknown format version."""
        self.state_dir = Path(state_dir)
        self.start_delay_s = start_delay_s
        self.stop_delay_s = stop_delay_s
        # Mutable so a test can make a VM's start fail and later succeed.
        self.fail_start = fail_start
        self._dir = self.state_dir / HANDLE_DIR
        self._vms: dict[str, DriverVm] = self._load()
        self._watchers: list[Callable[[str], None]] = []

    # -- persistence ------------------------------------------------------------------------

    def _handle(self, name: str) -> Path:
        """The handle file of VM ``name``; raises DriverError for a name that is no file name."""
        if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise DriverError(f"fake driver: vm name {name!r} cannot name a handle file")
        return self._dir / f"{name}{_HANDLE_SUFFIX}"

    def _load(self) -> dict[str, DriverVm]:
        """Read every handle file; temporary files (dot-prefixed, ``.tmp``) are ignored."""
        try:
            paths = sorted(p for p in self._dir.iterdir() if p.name.endswith(_HANDLE_SUFFIX))
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise DriverError(f"fake driver: cannot list {self._dir}: {exc}") from exc
        vms: dict[str, DriverVm] = {}
        for path in paths:
            if path.name.startswith("."):
                continue
            try:
                raw = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue  # destroyed by someone else since we listed the directory
            except OSError as exc:
                raise DriverError(f"fake driver: cannot read {path}: {exc}") from exc
            try:
                row = json.loads(raw)
                if row.get("version") != _FORMAT_VERSION:
                    raise ValueError(f"unsupported format version {row.get('version')!r}")
                vm = _from_json(row)
                if path.name != f"{vm.name}{_HANDLE_SUFFIX}":
                    raise ValueError(f"it holds vm {vm.name!r}")
            except (KeyError, TypeError, ValueError, AttributeError, ValidationError) as exc:
                raise DriverError(f"fake driver: corrupt handle file {path}: {exc}") from exc
            vms[vm.name] = vm
        return vms

    def _save(self, vm: DriverVm) -> None:
        """Write ``vm``'s handle file: a new one atomically (readers see no file or the whole
        one), an existing one rewritten in place.

        In place because ext4 flushes a file's data when it is renamed over another or
        truncated (``auto_da_alloc``): each update cost ~1 ms of a host's CPU (0.5-2 ms
        measured here), a third of a fake VM's start. The file never shrinks; a shorter
        record is padded with spaces, which JSON ignores. A write this small is done whole
        or not at all when the agent is killed; a power cut may tear it, which a test driver
        without guests can afford."""
        path = self._handle(vm.name)
        doc = {"version": _FORMAT_VERSION, **_to_json(vm)}
        # One line: json's C encoder (indent= falls back to pure Python).
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if vm.name in self._vms and self._rewrite(path, data):
            return
        # One writer per VM at a time, and no await in between: a fixed temporary name.
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise DriverError(f"fake driver: cannot write {path}: {exc}") from exc

    @staticmethod
    def _rewrite(path: Path, data: bytes) -> bool:
        """Overwrite the handle file in place; False when it is gone (write it anew)."""
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise DriverError(f"fake driver: cannot write {path}: {exc}") from exc
        try:
            padded = data.ljust(os.fstat(fd).st_size)
            if os.pwrite(fd, padded, 0) != len(padded):
                raise DriverError(f"fake driver: short write to {path}")
        except OSError as exc:
            raise DriverError(f"fake driver: cannot write {path}: {exc}") from exc
        finally:
            os.close(fd)
        return True

    def _remove(self, name: str) -> None:
        path = self._handle(name)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise DriverError(f"fake driver: cannot remove {path}: {exc}") from exc

    def _get(self, name: str) -> DriverVm:
        vm = self._vms.get(name)
        if vm is None:
            raise DriverError(f"fake driver: vm {name} is not defined on this host")
        return vm

    def _set(self, vm: DriverVm) -> DriverVm:
        """Persist ``vm``, then put it in the table (a failed write leaves both unchanged)."""
        self._save(vm)
        self._vms[vm.name] = vm
        return _copy(vm)

    @staticmethod
    def _now_after(previous: datetime | None) -> datetime:
        """Now, but strictly after ``previous`` (a reboot must visibly change ``started_at``)."""
        now = datetime.now(UTC)
        if previous is not None and now <= previous:
            now = previous + timedelta(microseconds=1)
        return now

    # -- test hooks -------------------------------------------------------------------------

    def inject_crash(self, name: str) -> None:
        """Turn a running VM ``crashed`` (as if its process died); raises DriverError otherwise."""
        vm = self._get(name)
        if vm.state != "running":
            raise DriverError(f"fake driver: cannot crash vm {name}: it is {vm.state}")
        self._set(replace(vm, state="crashed", started_at=None, message="fake driver: crashed"))
        self._notify(name)

    def inject_poweroff(self, name: str) -> None:
        """Make a running VM's guest power itself off (``stopped``, the message says so);
        raises DriverError when it is not running."""
        vm = self._get(name)
        if vm.state != "running":
            raise DriverError(f"fake driver: cannot power off vm {name}: it is {vm.state}")
        message = "the guest powered itself off"
        self._set(replace(vm, state="stopped", started_at=None, message=message))
        self._notify(name)

    # -- live migration (``fake_migration.FakeMigrator``) ----------------------------------

    def receive(
        self,
        name: str,
        *,
        state: RuntimeState,
        started_at: datetime | None,
        spec: VmSpec,
        extra: dict[str, str],
    ) -> DriverVm:
        """A migrated guest arrived: the defined VM runs here from now on, with the source's
        ``started_at`` (the same boot, not a restart). Raises DriverError when it already
        runs."""
        vm = self._get(name)
        if vm.state in ("running", "paused"):
            raise DriverError(f"fake driver: vm {name} already runs here")
        new = replace(vm, state=state, started_at=started_at, spec=spec, extra=extra, message="")
        return self._set(new)

    def migrated_away(self, name: str, target: str) -> DriverVm:
        """The guest runs on ``target`` now: the copy here is stopped (never resumed)."""
        vm = self._get(name)
        message = f"migrated to {target}"
        return self._set(replace(vm, state="stopped", started_at=None, message=message))

    def _notify(self, name: str) -> None:
        for callback in self._watchers:
            callback(name)

    # -- the Driver protocol ----------------------------------------------------------------

    def watch(self, callback: Callable[[str], None]) -> None:
        """``callback(name)`` after ``inject_crash`` / ``inject_poweroff``."""
        self._watchers.append(callback)

    async def fingerprint(self) -> dict[str, str]:
        """``{"hypervisor": "fake", "version": <corral version>}``."""
        return {"hypervisor": "fake", "version": __version__}

    async def host_cpu(self) -> HostCpu | None:
        """None: fake guests have no CPU model."""
        return None

    async def recover(self) -> builtins.list[DriverVm]:
        """Every VM in the persisted table, untouched: running ones stay running."""
        return [_copy(vm) for vm in sorted(self._vms.values(), key=lambda v: v.name)]

    async def define(self, vm: DriverVm) -> DriverVm:
        """Create ``vm`` stopped. Idempotent for the same name and vm_id (the stored VM is
        returned unchanged); raises DriverError when the name is taken by another vm_id."""
        existing = self._vms.get(vm.name)
        if existing is not None:
            if existing.vm_id != vm.vm_id:
                raise DriverError(
                    f"fake driver: vm {vm.name} is already defined with id {existing.vm_id}"
                )
            return _copy(existing)
        return self._set(replace(_copy(vm), state="stopped", started_at=None))

    async def start(self, name: str) -> DriverVm:
        """Boot after ``start_delay_s``; ``started_at`` becomes now. Idempotent when running.

        A paused VM resumes (``started_at`` kept). Raises DriverError for names matching
        ``fail_start``; the VM then stays as it was.
        """
        vm = self._get(name)
        if vm.state == "running":
            return _copy(vm)
        if self.start_delay_s > 0:
            await asyncio.sleep(self.start_delay_s)
        if self.fail_start and fnmatch.fnmatchcase(name, self.fail_start):
            raise DriverError(f"fake driver: injected start failure for vm {name}")
        vm = self._get(name)  # re-read: the table may have changed while we slept
        if vm.state == "running":
            return _copy(vm)
        started_at = vm.started_at if vm.state == "paused" else self._now_after(vm.started_at)
        return self._set(replace(vm, state="running", started_at=started_at, message=""))

    async def stop(self, name: str, *, force: bool = False, timeout_s: float = 60.0) -> DriverVm:
        """Power off: a graceful stop takes ``stop_delay_s`` (at most ``timeout_s``), ``force``
        none. Idempotent when stopped; a crashed VM is cleaned up to ``stopped``."""
        vm = self._get(name)
        if vm.state == "stopped":
            return _copy(vm)
        if not force and vm.state == "running":
            delay = min(self.stop_delay_s, timeout_s)
            if delay > 0:
                await asyncio.sleep(delay)
        vm = self._get(name)
        return self._set(replace(vm, state="stopped", started_at=None, message=""))

    async def reboot(self, name: str) -> DriverVm:
        """Reset a running VM: ``started_at`` becomes now. Raises DriverError if not running."""
        vm = self._get(name)
        if vm.state != "running":
            raise DriverError(f"fake driver: cannot reboot vm {name}: it is {vm.state}")
        return self._set(replace(vm, started_at=self._now_after(vm.started_at)))

    async def pause(self, name: str) -> DriverVm:
        """Freeze a running VM (``started_at`` kept). Idempotent when paused; raises
        DriverError when it is neither running nor paused."""
        return self._pause_or_resume(name, "paused")

    async def resume(self, name: str) -> DriverVm:
        """Unfreeze a paused VM. Idempotent when running; raises DriverError when it is neither
        running nor paused."""
        return self._pause_or_resume(name, "running")

    def _pause_or_resume(self, name: str, want: RuntimeState) -> DriverVm:
        vm = self._get(name)
        if vm.state == want:
            return _copy(vm)
        if vm.state not in ("running", "paused"):
            verb = "pause" if want == "paused" else "resume"
            raise DriverError(f"fake driver: cannot {verb} vm {name}: it is {vm.state}")
        return self._set(replace(vm, state=want))

    async def update(self, name: str, vm: DriverVm) -> DriverVm:
        """Store ``vm``'s spec, epoch, generations, message and extra; the runtime state and
        ``started_at`` stay the hypervisor's. Raises DriverError when vm_id differs."""
        current = self._get(name)
        if vm.vm_id != current.vm_id:
            raise DriverError(f"fake driver: vm {name} has id {current.vm_id}, not {vm.vm_id}")
        new = replace(_copy(vm), name=name, state=current.state, started_at=current.started_at)
        return self._set(new)

    async def attach_disk(self, name: str, disk: DriverDisk) -> DriverVm:
        """Record the disk (at the end); idempotent for a disk id already attached."""
        vm = self._get(name)
        if any(d.id == disk.id for d in vm.disks):
            return _copy(vm)
        return self._set(replace(vm, disks=(*vm.disks, disk)))

    async def detach_disk(self, name: str, disk_id: str) -> DriverVm:
        """Forget the disk; idempotent for a disk not attached."""
        vm = self._get(name)
        return self._set(replace(vm, disks=tuple(d for d in vm.disks if d.id != disk_id)))

    async def destroy(self, name: str) -> None:
        """Remove the VM (stopping it first is implied). Idempotent."""
        if name in self._vms:
            self._remove(name)
            del self._vms[name]

    async def inspect(self, name: str) -> DriverVm | None:
        """A copy of the VM, or None when it is not defined here."""
        vm = self._vms.get(name)
        return _copy(vm) if vm is not None else None

    async def close(self) -> None:
        """Nothing to release: the table is already on disk. VMs keep "running"."""

    async def list(self) -> builtins.list[DriverVm]:
        """Copies of every defined VM, sorted by name."""
        return [_copy(vm) for vm in sorted(self._vms.values(), key=lambda v: v.name)]
