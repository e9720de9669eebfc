"""The ``qemu`` driver: one daemonized ``qemu-system-x86_64`` per VM, driven over QMP.

Each VM has a directory ``<state_dir>/vms/<name>/`` holding its handle (``handle.json``, see
``handle.py``) and its run files: ``qmp.sock``, ``serial.sock`` (the serial console; one client
at a time), ``console.log`` (everything the guest printed on the console, appended across
boots), ``qemu.pid`` and ``qemu.log`` (what QEMU printed while starting).

What the driver reports, from the live process and QMP, never from hope:

- ``running`` / ``paused``: the VM's QEMU (same pid *and* ``-uuid`` in its command line) is
  alive and QMP says so (any other non-running QMP state, e.g. ``inmigrate``, is ``paused``
  with the state in the message);
- ``stopped``: no QEMU, and the driver stopped it, or the guest powered itself off. QEMU runs
  with ``-no-shutdown``, so a guest poweroff leaves QEMU alive in QMP state ``shutdown``; the
  next ``inspect`` / ``list`` / ``recover`` notices, quits that QEMU and records the VM stopped
  with the message "the guest powered itself off";
- ``crashed``: the QEMU is gone although the driver started it and never stopped it (killed
  from outside, QEMU died), or QMP reports ``internal-error``, ``io-error`` or ``guest-panicked``.

Guests outlive the agent: QEMU runs as a daemon in its own session, and ``recover`` (or any
read) on a new driver over the same state directory re-attaches over QMP without restarting it;
``started_at`` stays the one recorded at launch. Operations on one VM are serialised by a
per-VM lock; reads take no lock (they only wait for one when they reap a powered-off guest).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import shutil
import signal
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from corral.agent.drivers.base import DriverBoot, DriverDisk, DriverVm, RuntimeState
from corral.agent.drivers.qemu import snapshots
from corral.agent.drivers.qemu.cmdline import (
    MAX_DISKS,
    VNC_BASE_PORT,
    DirectKernelBoot,
    DiskConfig,
    Machine,
    QemuConfig,
    blockdev,
    build_argv,
    disk_device,
    validation_message,
)
from corral.agent.drivers.qemu.handle import (
    VMS_DIR,
    QemuHandle,
    StoredBoot,
    StoredDisk,
    load_handles,
    save_handle,
    top_node,
)
from corral.agent.drivers.qemu.process import (
    expand_host_cpu,
    is_vm_process,
    launch,
    probe_kvm,
    qemu_version,
    read_pidfile,
    signal_vm,
    wait_exit,
)
from corral.agent.drivers.qemu.qmp import LIFECYCLE_EVENTS, QmpSession
from corral.errors import DriverError
from corral.model import HostCpu
from corral.model.common import DNS_LABEL_RE
from corral.model.vm import VmNic

__all__ = ["EXTRA_PREFIX", "GUEST_POWERED_OFF", "QemuDriver"]

log = logging.getLogger(__name__)

AccelSetting = Literal["auto", "kvm", "tcg"]
EXTRA_PREFIX = "qemu."
"""``DriverVm.extra`` keys the driver fills from the live VM (pid, VNC address, console log);
``update`` drops them, so only the agent's own keys are stored."""
GUEST_POWERED_OFF = "the guest powered itself off"
_CRASHED_STATUSES = frozenset({"internal-error", "io-error", "guest-panicked"})
# A QEMU in these states holds a guest that is (being) migrated: it must never be resumed
# (``cont`` on a migrated-away copy would run the guest twice), only quit.
_MIGRATION_STATUSES = frozenset({"inmigrate", "postmigrate", "finish-migrate"})
_RUNNING_WAIT_S = 10.0
_KILL_WAIT_S = 5.0
# A guest still booting misses an ACPI button press; pressing again is harmless to one that
# is already shutting down.
_POWERDOWN_REPEAT_S = 5.0
_MAX_VNC_DISPLAY = 999
_LAUNCH_ATTEMPTS = 3
_UNPLUG_WAIT_S = 30.0


def _disk_config(disk: DriverDisk) -> DiskConfig:
    return DiskConfig.model_validate(
        {"path": disk.path, "format": disk.format, "read_only": disk.read_only, "id": disk.id}
    )


@dataclass(frozen=True)
class _Runtime:
    """What the process and QMP say now; ``status`` is None when there is no QEMU."""

    state: RuntimeState
    message: str
    status: str | None


def _now_after(previous: datetime | None) -> datetime:
    """Now, but strictly after ``previous`` (a reboot must visibly change ``started_at``)."""
    now = datetime.now(UTC)
    if previous is not None and now <= previous:
        now = previous + timedelta(microseconds=1)
    return now


def _port_free(port: int) -> bool:
    """Whether QEMU could listen on 127.0.0.1:port now (it binds with SO_REUSEADDR too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class QemuDriver:
    """Real VMs under QEMU (see the module docstring for the states it reports).

    ``boot`` is the default boot source of VMs defined without one (the agent passes the test
    guest's kernel, initrd and command line). ``accel="auto"`` probes KVM once (see
    ``process.probe_kvm``) and falls back to TCG. ``stop_timeout_s`` bounds the graceful part
    of ``destroy`` and of a ``stop`` called with ``timeout_s=None``. Every method raises
    ``DriverError`` for a VM that is not defined here (except ``inspect`` and ``destroy``).
    """

    name: str = "qemu"

    def __init__(
        self,
        state_dir: Path,
        *,
        qemu_binary: str = "qemu-system-x86_64",
        accel: AccelSetting = "auto",
        stop_timeout_s: float = 60.0,
        boot: DirectKernelBoot | None = None,
        machine: Machine = "q35",
        vga: bool = True,
        kvm_probe_timeout_s: float = 3.0,
    ) -> None:
        """Load every handle in ``state_dir``; raises DriverError naming a corrupt one. Nothing
        is started or connected until a method needs it."""
        if accel not in ("auto", "kvm", "tcg"):
            raise DriverError(f"qemu driver: accel must be auto, kvm or tcg, not {accel!r}")
        self.state_dir = Path(state_dir).absolute()
        self.qemu_binary = qemu_binary
        self.accel: AccelSetting = accel
        self.stop_timeout_s = stop_timeout_s
        self.boot = boot
        self.machine: Machine = machine
        self.vga = vga
        self.kvm_probe_timeout_s = kvm_probe_timeout_s
        self._vms_dir = self.state_dir / VMS_DIR
        self._handles: dict[str, QemuHandle] = load_handles(self._vms_dir)
        self._sessions: dict[str, QmpSession] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._connect_locks: dict[str, asyncio.Lock] = {}
        self._resolved: tuple[str, str] | None = None
        self._version: str | None = None
        self._host_cpu: HostCpu | None = None
        self._probe_lock = asyncio.Lock()
        self._watchers: list[Callable[[str], None]] = []
        self._event_tasks: dict[str, asyncio.Task[None]] = {}

    # -- handles ----------------------------------------------------------------------------

    def _vm_dir(self, name: str) -> Path:
        if not DNS_LABEL_RE.match(name):
            raise DriverError(f"qemu driver: vm name {name!r} must be a DNS label")
        return self._vms_dir / name

    def _get(self, name: str) -> QemuHandle:
        handle = self._handles.get(name)
        if handle is None:
            raise DriverError(f"qemu driver: vm {name} is not defined on this host")
        return handle

    def _patch(self, name: str, **changes: Any) -> QemuHandle:
        """Apply ``changes`` to the current handle and persist it (no await: atomic here)."""
        handle = self._get(name).model_copy(update=changes)
        save_handle(self._vm_dir(name), handle)
        self._handles[name] = handle
        return handle

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # -- QMP and the process ----------------------------------------------------------------

    def _alive(self, handle: QemuHandle) -> bool:
        return is_vm_process(handle.pid, handle.uuid)

    async def _session(self, handle: QemuHandle) -> QmpSession:
        """The VM's QMP session, connected on first use (one at a time: QEMU serves one)."""
        name = handle.name
        async with self._connect_locks.setdefault(name, asyncio.Lock()):
            session = self._sessions.get(name)
            if session is not None and session.connected:
                return session
            session = await QmpSession.connect(self._vm_dir(name) / "qmp.sock", label=name)
            self._sessions[name] = session
            if self._watchers:
                old = self._event_tasks.pop(name, None)
                if old is not None:
                    old.cancel()
                self._event_tasks[name] = asyncio.create_task(
                    self._follow_events(name, session), name=f"qmp-events-{name}"
                )
            return session

    async def _follow_events(self, name: str, session: QmpSession) -> None:
        """Tell the watchers about every lifecycle event of the VM (SHUTDOWN, RESET, STOP,
        RESUME, POWERDOWN), and when its QMP connection ends (QEMU exited or was killed)."""
        try:
            async with session.events(LIFECYCLE_EVENTS) as events:
                async for event in events:
                    log.debug("vm %s: qmp event %s", name, event.name)
                    self._notify(name)
            if self._sessions.get(name) is session:  # not closed by us: QEMU went away
                self._notify(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let a watcher kill anything
            log.debug("vm %s: event watcher ended: %s", name, exc)

    def _notify(self, name: str) -> None:
        for callback in self._watchers:
            callback(name)

    async def _drop_session(self, name: str) -> None:
        task = self._event_tasks.pop(name, None)
        if task is not None:
            task.cancel()
        session = self._sessions.pop(name, None)
        if session is not None:
            await session.close()

    def _adopt(self, handle: QemuHandle) -> QemuHandle:
        """Record a QEMU of this VM that its pid file names but the handle does not: an agent
        that died between QEMU daemonizing and writing the handle left it running."""
        pid = read_pidfile(self._vm_dir(handle.name) / "qemu.pid")
        if pid is None or pid == handle.pid or not is_vm_process(pid, handle.uuid):
            return handle
        started_at = handle.started_at or datetime.now(UTC)
        return self._patch(handle.name, pid=pid, power="running", started_at=started_at)

    async def _runtime(self, handle: QemuHandle) -> _Runtime:
        """Observe the VM's QEMU; no side effect besides connecting or dropping its session
        (and adopting an unrecorded QEMU of this VM, see ``_adopt``)."""
        if not self._alive(handle):
            handle = self._adopt(handle)
        if not self._alive(handle):
            await self._drop_session(handle.name)
            if handle.power == "running":
                return _Runtime(
                    "crashed",
                    f"qemu (pid {handle.pid}) exited without the driver stopping it",
                    None,
                )
            return _Runtime("stopped", handle.stop_message, None)
        try:
            status = await (await self._session(handle)).status()
        except DriverError:
            if not self._alive(handle):  # it died while we asked
                return await self._runtime(handle)
            await self._drop_session(handle.name)
            raise
        if status == "running":
            return _Runtime("running", "", status)
        if status == "shutdown":
            return _Runtime("stopped", GUEST_POWERED_OFF, status)
        if status in _CRASHED_STATUSES:
            return _Runtime("crashed", f"qemu reports {status}", status)
        return _Runtime("paused", "" if status == "paused" else f"qemu reports {status}", status)

    async def _terminate(self, handle: QemuHandle) -> None:
        """Make the VM's QEMU exit now: QMP ``quit`` (SIGTERM when QMP cannot be had; both let
        QEMU flush its disks), then SIGKILL if it is still there after a grace period. Raises
        DriverError when even SIGKILL did not end it."""
        if self._alive(handle):
            try:
                await (await self._session(handle)).quit()
            except DriverError:
                signal_vm(handle.pid, handle.uuid, signal.SIGTERM)
            if not await wait_exit(handle.pid, handle.uuid, _KILL_WAIT_S):
                signal_vm(handle.pid, handle.uuid, signal.SIGKILL)
                if not await wait_exit(handle.pid, handle.uuid, _KILL_WAIT_S):
                    raise DriverError(
                        f"qemu driver: vm {handle.name}: qemu (pid {handle.pid}) survived SIGKILL"
                    )
        await self._drop_session(handle.name)

    async def _reap(self, name: str, message: str) -> QemuHandle:
        """Terminate the VM's QEMU and record it stopped with ``message``."""
        # Recorded as stopped *before* QEMU goes, so a concurrent read never sees a QEMU that
        # is gone while the handle still says running (that would read as a crash). The pid
        # stays until it has exited: a QEMU that survives is still found and reported.
        handle = self._patch(name, power="stopped", stop_message=message)
        await self._terminate(handle)
        return self._patch(name, pid=None, started_at=None)

    async def _powerdown(self, handle: QemuHandle, timeout_s: float) -> bool:
        """Press the power button (again every few seconds) until the guest powers off; True
        when it did (or QEMU went away) within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        session = await self._session(handle)
        async with session.events(("SHUTDOWN",)) as events:
            status = await session.status()
            if status == "shutdown":
                return True
            if status in _MIGRATION_STATUSES:
                return False  # no guest to shut down here: quit this QEMU
            if status != "running":
                try:
                    await session.cont()  # a paused guest cannot see the button
                except DriverError:
                    return False
            while True:
                await session.system_powerdown()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    if await events.next(min(remaining, _POWERDOWN_REPEAT_S)) is not None:
                        return True
                except DriverError:
                    return True  # QEMU hung up: it is gone, which is what we wanted
                if loop.time() >= deadline:
                    return False

    async def _powerdown_or_false(self, handle: QemuHandle, timeout_s: float) -> bool:
        """``_powerdown``, but a QMP failure counts as "did not power off": stopping then goes
        on to terminate QEMU instead of failing with the VM still up."""
        try:
            return await self._powerdown(handle, timeout_s)
        except DriverError:
            return False

    # -- launching --------------------------------------------------------------------------

    async def _accelerator(self) -> tuple[str, str]:
        """The accelerator VMs launch with and why: as configured, or probed once (``auto``)."""
        if self.accel != "auto":
            return self.accel, "configured"
        async with self._probe_lock:
            if self._resolved is None:
                usable, reason = await probe_kvm(self.qemu_binary, self.kvm_probe_timeout_s)
                self._resolved = ("kvm", reason) if usable else ("tcg", f"kvm unusable: {reason}")
            return self._resolved

    async def _qemu_version(self) -> str:
        if self._version is None:
            self._version = await qemu_version(self.qemu_binary)
        return self._version

    def _pick_display(self, name: str) -> int:
        """The lowest VNC display no other VM here uses and whose port is free now."""
        used = {h.vnc_display for n, h in self._handles.items() if n != name}
        for display in range(_MAX_VNC_DISPLAY + 1):
            if display not in used and _port_free(VNC_BASE_PORT + display):
                return display
        raise DriverError(f"qemu driver: no free VNC display in 0..{_MAX_VNC_DISPLAY}")

    def _config(
        self,
        name: str,
        *,
        accel: str,
        boot: StoredBoot | None,
        disks: Sequence[StoredDisk],
        spec_vcpus: int,
        spec_memory_mib: int,
        vm_uuid: str,
        machine: Machine,
        vnc_display: int,
        nics: Sequence[VmNic] = (),
    ) -> QemuConfig:
        """A validated QemuConfig; DriverError naming every broken field otherwise."""
        # One model_validate over plain data, so an error names its full path (boot.kernel).
        try:
            return QemuConfig.model_validate(
                {
                    "name": name,
                    "uuid": vm_uuid,
                    "vcpus": spec_vcpus,
                    "memory_mib": spec_memory_mib,
                    "machine": machine,
                    "accel": accel,
                    "boot": boot.model_dump() if boot is not None else None,
                    "disks": [d.model_dump() for d in disks],
                    "run_dir": self._vm_dir(name),
                    "vnc_display": vnc_display,
                    "vga": self.vga,
                    "nics": [n.mac for n in nics if n.mac],
                }
            )
        except ValidationError as exc:
            raise DriverError(f"qemu driver: vm {name}: {validation_message(exc)}") from exc

    def _handle_config(self, handle: QemuHandle, accel: str) -> QemuConfig:
        return self._config(
            handle.name,
            accel=accel,
            boot=handle.boot,
            disks=handle.disks,
            spec_vcpus=handle.spec.vcpus,
            spec_memory_mib=handle.spec.memory_mib,
            vm_uuid=handle.uuid,
            machine=handle.machine,
            vnc_display=handle.vnc_display,
            nics=handle.spec.nics,
        )

    async def _launch(self, name: str) -> QemuHandle:
        """Start a QEMU for a VM that has none and wait until QMP says ``running``."""
        accel, _ = await self._accelerator()
        version = await self._qemu_version()
        vm_dir = self._vm_dir(name)
        for attempt in range(1, _LAUNCH_ATTEMPTS + 1):
            handle = self._get(name)
            if not _port_free(VNC_BASE_PORT + handle.vnc_display):
                handle = self._patch(name, vnc_display=self._pick_display(name))
            config = self._handle_config(handle, accel)
            for stale in (config.qmp_socket, config.serial_socket):
                stale.unlink(missing_ok=True)
            try:
                pid = await launch(
                    build_argv(config, binary=self.qemu_binary),
                    pidfile=config.pidfile,
                    log=vm_dir / "qemu.log",
                    label=name,
                )
                break
            except DriverError as exc:
                # Another process took the VNC port since we checked ("-vnc 127.0.0.1:N: Failed
                # to find an available port"): the next attempt picks another display.
                if "-vnc " not in str(exc) or attempt == _LAUNCH_ATTEMPTS:
                    raise
        handle = self._patch(
            name,
            power="running",
            pid=pid,
            started_at=_now_after(handle.started_at),
            accel=accel,
            qemu_version=version,
            stop_message="",
        )
        try:
            session = await self._session(handle)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _RUNNING_WAIT_S
            while (status := await session.status()) != "running":
                if loop.time() >= deadline:
                    raise DriverError(f"qemu driver: vm {name}: qemu is {status}, not running")
                await asyncio.sleep(0.05)
        except DriverError:
            await self._reap(name, "")
            raise
        return handle

    # -- views ------------------------------------------------------------------------------

    def _driver_vm(self, name: str, runtime: _Runtime) -> DriverVm:
        """The DriverVm of ``name``'s handle as it is now (observing may have updated it)."""
        handle = self._get(name)
        live = runtime.state in ("running", "paused")
        extra = dict(handle.extra)
        extra[f"{EXTRA_PREFIX}vnc"] = f"127.0.0.1:{VNC_BASE_PORT + handle.vnc_display}"
        extra[f"{EXTRA_PREFIX}console_log"] = str(self._vm_dir(handle.name) / "console.log")
        if runtime.status is not None and handle.pid is not None:
            extra[f"{EXTRA_PREFIX}pid"] = str(handle.pid)
        if handle.accel:
            extra[f"{EXTRA_PREFIX}accel"] = handle.accel
        if handle.qemu_version and live:
            extra[f"{EXTRA_PREFIX}version"] = handle.qemu_version
        boot = handle.boot
        return DriverVm(
            name=handle.name,
            vm_id=handle.vm_id,
            epoch=handle.epoch,
            spec=handle.spec.model_copy(deep=True),
            state=runtime.state,
            started_at=handle.started_at if live else None,
            applied_generation=handle.applied_generation,
            reboot_generation=handle.reboot_generation,
            message=runtime.message or handle.message,
            extra=extra,
            disks=tuple(
                DriverDisk(id=d.id, path=d.path, format=d.format, read_only=d.read_only)
                for d in handle.disks
            ),
            boot=DriverBoot(
                kernel=boot.kernel if boot else None,
                initrd=boot.initrd if boot else None,
                cmdline=boot.cmdline if boot else "",
            ),
        )

    async def _current(self, name: str) -> DriverVm | None:
        """The VM as it is now; reaps a guest that powered itself off. None if undefined."""
        handle = self._handles.get(name)
        if handle is None:
            return None
        runtime = await self._runtime(handle)
        lock = self._lock(name)
        if runtime.status == "shutdown" and not lock.locked():
            async with lock:
                handle = self._handles.get(name)
                if handle is None:
                    return None
                runtime = await self._runtime(handle)
                if runtime.status == "shutdown":
                    await self._reap(name, GUEST_POWERED_OFF)
                    runtime = _Runtime("stopped", GUEST_POWERED_OFF, None)
        if name not in self._handles:
            return None  # destroyed while we looked
        return self._driver_vm(name, runtime)

    # -- the Driver protocol ----------------------------------------------------------------

    def watch(self, callback: Callable[[str], None]) -> None:
        """``callback(name)`` on every QMP lifecycle event of a VM and when its QEMU goes away
        (the events of VMs whose QMP session is open: every VM the driver has looked at)."""
        self._watchers.append(callback)

    async def fingerprint(self) -> dict[str, str]:
        """``hypervisor``, ``version`` (of the QEMU binary), ``accelerator`` (what VMs launch
        with: ``kvm`` or ``tcg``), ``accelerator_reason``, ``machine`` and ``binary``."""
        accel, reason = await self._accelerator()
        return {
            "hypervisor": "qemu",
            "version": await self._qemu_version(),
            "accelerator": accel,
            "accelerator_reason": reason,
            "machine": self.machine,
            "binary": shutil.which(self.qemu_binary) or self.qemu_binary,
        }

    async def host_cpu(self) -> HostCpu | None:
        """Under KVM, the CPU ``-cpu host`` guests see here (probed once); None under TCG,
        or when the probe fails (then KVM guests of this host do not migrate live)."""
        accel, _ = await self._accelerator()
        if accel != "kvm":
            return None
        if self._host_cpu is None:
            try:
                self._host_cpu = await expand_host_cpu(self.qemu_binary)
            except DriverError as exc:
                log.warning("qemu driver: cannot read the host CPU model: %s", exc)
                return None
        return self._host_cpu

    async def recover(self) -> builtins.list[DriverVm]:
        """Every VM with a handle here, re-attached over QMP when its QEMU (same pid and uuid)
        still runs: running VMs stay running with their original ``started_at``."""
        return await self.list()

    async def define(
        self,
        vm: DriverVm,
        *,
        disks: Sequence[DiskConfig] = (),
        boot: DirectKernelBoot | None = None,
    ) -> DriverVm:
        """Create the VM stopped, with ``disks`` (virtio, in order: /dev/vda, /dev/vdb, ...) and
        ``boot`` (default: the driver's). ``vm.disks`` and ``vm.boot`` are used when the keyword
        arguments are not given (``vm.boot`` without a kernel boots the first disk). Everything
        is validated now (files exist, names, socket path length). Idempotent for the same name
        and vm_id (the stored VM is returned unchanged); raises DriverError when the name is
        taken by another vm_id."""
        vm_dir = self._vm_dir(vm.name)
        if not disks and vm.disks:
            disks = [_disk_config(d) for d in vm.disks]
        stored_boot: StoredBoot | None
        if boot is not None:
            stored_boot = StoredBoot.of(boot)
        elif vm.boot is not None:
            stored_boot = (
                StoredBoot(kernel=vm.boot.kernel, initrd=vm.boot.initrd, cmdline=vm.boot.cmdline)
                if vm.boot.kernel
                else None
            )
        elif self.boot is not None:
            stored_boot = StoredBoot.of(self.boot)
        else:
            raise DriverError(
                f"qemu driver: vm {vm.name}: no boot source (pass boot= to define or to "
                "QemuDriver, or give the vm an image)"
            )
        async with self._lock(vm.name):
            existing = self._handles.get(vm.name)
            if existing is not None:
                if existing.vm_id != vm.vm_id:
                    raise DriverError(
                        f"qemu driver: vm {vm.name} is already defined with id {existing.vm_id}"
                    )
            else:
                handle = QemuHandle(
                    name=vm.name,
                    vm_id=vm.vm_id,
                    epoch=vm.epoch,
                    spec=vm.spec.model_copy(deep=True),
                    applied_generation=vm.applied_generation,
                    reboot_generation=vm.reboot_generation,
                    message=vm.message,
                    extra={k: v for k, v in vm.extra.items() if not k.startswith(EXTRA_PREFIX)},
                    uuid=str(uuid.uuid4()),
                    machine=self.machine,
                    boot=stored_boot,
                    disks=tuple(StoredDisk.of(d, slot=i) for i, d in enumerate(disks)),
                    vnc_display=self._pick_display(vm.name),
                )
                self._handle_config(handle, "tcg")  # validate now, not at the first start
                save_handle(vm_dir, handle)
                self._handles[vm.name] = handle
        current = await self._current(vm.name)
        assert current is not None
        return current

    async def start(self, name: str) -> DriverVm:
        """Boot the VM and return once QMP reports it ``running``; ``started_at`` becomes now.
        Idempotent when running; a paused VM resumes (``started_at`` kept); a crashed or
        powered-off QEMU still present is quit first. Raises DriverError with QEMU's own error
        when it cannot start (the VM then stays stopped)."""
        async with self._lock(name):
            handle = self._get(name)
            runtime = await self._runtime(handle)
            if runtime.state == "running":
                return self._driver_vm(name, runtime)
            if runtime.state == "paused":
                if runtime.status in _MIGRATION_STATUSES:
                    raise DriverError(
                        f"qemu driver: vm {name}: qemu is {runtime.status}; a migrating copy "
                        "is never resumed"
                    )
                await (await self._session(handle)).cont()
                return self._driver_vm(name, await self._runtime(self._get(name)))
            if runtime.status is not None:
                await self._reap(name, "")
            await self._launch(name)
            return self._driver_vm(name, await self._runtime(self._get(name)))

    async def stop(
        self, name: str, *, force: bool = False, timeout_s: float | None = None
    ) -> DriverVm:
        """Power the VM off: press the ACPI power button and wait up to ``timeout_s`` (default
        ``stop_timeout_s``) for the guest to power off, then quit QEMU (killing it if it does
        not exit). ``force`` skips the guest: QMP ``quit`` at once, SIGKILL if that fails.
        Idempotent when stopped; a crashed VM is cleaned up to ``stopped``. When the guest
        ignored the button the stopped VM's message says so."""
        timeout = self.stop_timeout_s if timeout_s is None else timeout_s
        async with self._lock(name):
            handle = await self._stop_locked(name, force=force, timeout_s=timeout)
            return self._driver_vm(name, _Runtime("stopped", handle.stop_message, None))

    async def _stop_locked(self, name: str, *, force: bool, timeout_s: float) -> QemuHandle:
        handle = self._get(name)
        runtime = await self._runtime(handle)
        message = ""
        if runtime.status is None:
            return self._patch(name, power="stopped", pid=None, started_at=None, stop_message="")
        graceful = not force and runtime.state in ("running", "paused")
        if graceful and not await self._powerdown_or_false(handle, timeout_s):
            message = f"the guest did not power off within {timeout_s:g} s; qemu was killed"
        return await self._reap(name, message)

    async def reboot(self, name: str) -> DriverVm:
        """Reset a running VM (QMP ``system_reset``: the guest boots again; ``started_at``
        becomes now). Raises DriverError when it is not running."""
        async with self._lock(name):
            handle = self._get(name)
            runtime = await self._runtime(handle)
            if runtime.state != "running":
                raise DriverError(f"qemu driver: cannot reboot vm {name}: it is {runtime.state}")
            await (await self._session(handle)).system_reset()
            self._patch(name, started_at=_now_after(self._get(name).started_at))
            return self._driver_vm(name, runtime)

    async def update(self, name: str, vm: DriverVm) -> DriverVm:
        """Store ``vm``'s spec, epoch, generations, message and extra (minus the ``qemu.`` keys
        the driver fills itself); hardware changes take effect at the next start. Raises
        DriverError when ``vm.vm_id`` is not the VM's."""
        current = self._get(name)
        if vm.vm_id != current.vm_id:
            raise DriverError(f"qemu driver: vm {name} has id {current.vm_id}, not {vm.vm_id}")
        self._patch(
            name,
            epoch=vm.epoch,
            spec=vm.spec.model_copy(deep=True),
            applied_generation=vm.applied_generation,
            reboot_generation=vm.reboot_generation,
            message=vm.message,
            extra={k: v for k, v in vm.extra.items() if not k.startswith(EXTRA_PREFIX)},
        )
        current_vm = await self._current(name)
        if current_vm is None:
            raise DriverError(f"qemu driver: vm {name} was destroyed during the update")
        return current_vm

    async def destroy(self, name: str) -> None:
        """Stop the VM (gracefully, up to ``stop_timeout_s``) and remove its directory: handle,
        sockets and console log. Disk images are not the driver's and stay. Idempotent."""
        vm_dir = self._vm_dir(name)
        async with self._lock(name):
            if name in self._handles:
                await self._stop_locked(name, force=False, timeout_s=self.stop_timeout_s)
                del self._handles[name]
            try:
                shutil.rmtree(vm_dir, ignore_errors=False)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise DriverError(f"qemu driver: cannot remove {vm_dir}: {exc}") from exc

    async def inspect(self, name: str) -> DriverVm | None:
        """The VM as its QEMU and QMP show it now, or None when it is not defined here."""
        return await self._current(name)

    async def list(self) -> builtins.list[DriverVm]:
        """Every VM defined here (observed concurrently), sorted by name."""
        found = await asyncio.gather(*(self._current(n) for n in sorted(self._handles)))
        return [vm for vm in found if vm is not None]

    async def close(self) -> None:
        """Disconnect every QMP session; the VMs keep running."""
        for name in builtins.list(self._sessions):
            await self._drop_session(name)

    async def pause(self, name: str) -> DriverVm:
        """Freeze a running VM's vCPUs (QMP ``stop``); idempotent when paused. Raises
        DriverError when the VM is neither."""
        return await self._pause_or_resume(name, pause=True)

    async def resume(self, name: str) -> DriverVm:
        """Let a paused VM run again (QMP ``cont``); idempotent when running. Raises
        DriverError when the VM is neither."""
        return await self._pause_or_resume(name, pause=False)

    async def _pause_or_resume(self, name: str, *, pause: bool) -> DriverVm:
        want: RuntimeState = "paused" if pause else "running"
        async with self._lock(name):
            handle = self._get(name)
            runtime = await self._runtime(handle)
            if runtime.state == want:
                return self._driver_vm(name, runtime)
            if runtime.state not in ("running", "paused"):
                verb = "pause" if pause else "resume"
                raise DriverError(f"qemu driver: cannot {verb} vm {name}: it is {runtime.state}")
            if runtime.status in _MIGRATION_STATUSES:
                raise DriverError(
                    f"qemu driver: vm {name}: qemu is {runtime.status}; a migrating copy is "
                    "never paused or resumed"
                )
            session = await self._session(handle)
            await (session.stop() if pause else session.cont())
            return self._driver_vm(name, await self._runtime(self._get(name)))

    async def attach_disk(self, name: str, disk: DriverDisk) -> DriverVm:
        """Add a disk on the lowest free slot: into the running guest (QMP ``blockdev-add`` +
        ``device_add`` on its hot-plug port), or for the next start. Idempotent for a disk id
        already attached."""
        async with self._lock(name):
            handle = self._get(name)
            if any(d.id == disk.id for d in handle.disks):
                return self._driver_vm(name, await self._runtime(handle))
            used = {d.slot if d.slot is not None else i for i, d in enumerate(handle.disks)}
            free = [slot for slot in range(MAX_DISKS) if slot not in used]
            if not free:
                raise DriverError(f"qemu driver: vm {name} already has {MAX_DISKS} disks")
            slot = free[0]
            config = self._disk_config_checked(name, disk, slot)
            runtime = await self._runtime(handle)
            if runtime.status is not None:
                session = await self._session(handle)
                node = blockdev(slot, config)
                await session.execute("blockdev-add", node)
                try:
                    await session.execute("device_add", disk_device(slot, handle.machine))
                except DriverError:
                    await session.execute("blockdev-del", {"node-name": f"disk{slot}"})
                    raise
            handle = self._patch(name, disks=(*handle.disks, StoredDisk.of(config, slot=slot)))
            return self._driver_vm(name, await self._runtime(handle))

    async def detach_disk(self, name: str, disk_id: str) -> DriverVm:
        """Remove a disk: from a running guest, ``device_del`` and wait (up to
        ``_UNPLUG_WAIT_S``) for the guest to release it, then ``blockdev-del``; from a stopped
        VM's definition at once. Idempotent for a disk not attached."""
        async with self._lock(name):
            handle = self._get(name)
            index = next((i for i, d in enumerate(handle.disks) if d.id == disk_id), None)
            if index is None:
                return self._driver_vm(name, await self._runtime(handle))
            stored = handle.disks[index]
            slot = stored.slot if stored.slot is not None else index
            runtime = await self._runtime(handle)
            if runtime.status is not None:
                session = await self._session(handle)
                async with session.events(("DEVICE_DELETED",)) as events:
                    await session.execute("device_del", {"id": f"virtio-disk{slot}"})
                    await self._wait_unplugged(name, events, f"virtio-disk{slot}")
                # Overlays a linked clone put on top go first, newest first (see layers.py).
                for node in (*reversed(handle.live_layers(stored)), f"disk{slot}"):
                    await session.execute("blockdev-del", {"node-name": node})
            disks = tuple(d for d in handle.disks if d.id != disk_id)
            handle = self._patch(name, disks=disks)
            return self._driver_vm(name, await self._runtime(handle))

    async def _wait_unplugged(self, name: str, events: Any, device: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _UNPLUG_WAIT_S
        while (remaining := deadline - loop.time()) > 0:
            event = await events.next(remaining)
            if event is not None and event.data.get("device") == device:
                return
        raise DriverError(
            f"qemu driver: vm {name}: the guest did not release disk {device} within "
            f"{_UNPLUG_WAIT_S:g} s (unmount it in the guest, or stop the vm and detach again)"
        )

    async def resize_disk(self, name: str, disk_id: str, size_bytes: int) -> bool:
        """Grow an attached disk of a running guest (QMP ``block_resize``); False when the VM
        has no QEMU now (then the caller grows the file itself)."""
        async with self._lock(name):
            handle = self._get(name)
            index = next((i for i, d in enumerate(handle.disks) if d.id == disk_id), None)
            if index is None:
                raise DriverError(f"qemu driver: vm {name} has no disk {disk_id}")
            stored = handle.disks[index]
            runtime = await self._runtime(handle)
            if runtime.status is None:
                return False
            session = await self._session(handle)
            node = top_node(handle, index, stored)
            await session.execute("block_resize", {"node-name": node, "size": size_bytes})
            return True

    def _disk_config_checked(self, name: str, disk: DriverDisk, slot: int) -> DiskConfig:
        try:
            return DiskConfig.model_validate(
                {
                    "path": disk.path,
                    "format": disk.format,
                    "read_only": disk.read_only,
                    "id": disk.id,
                    "slot": slot,
                }
            )
        except ValidationError as exc:
            raise DriverError(f"qemu driver: vm {name}: disk: {validation_message(exc)}") from exc

    # -- beyond the protocol ----------------------------------------------------------------

    def console_log_path(self, name: str) -> Path:
        """The file every byte the guest printed on its serial console is appended to."""
        self._get(name)
        return self._vm_dir(name) / "console.log"

    def console_socket_path(self, name: str) -> Path:
        """The serial console's unix socket (read output, type input; one client at a time)."""
        self._get(name)
        return self._vm_dir(name) / "serial.sock"

    def vnc_port(self, name: str) -> int:
        """The TCP port on 127.0.0.1 of the VM's VNC console."""
        return VNC_BASE_PORT + self._get(name).vnc_display

    async def command_line(self, name: str) -> builtins.list[str]:
        """The argv the next ``start`` of this VM would run (for operators and benchmarks)."""
        accel, _ = await self._accelerator()
        return build_argv(self._handle_config(self._get(name), accel), binary=self.qemu_binary)

    # -- snapshots and disk copies (see snapshots.py) ---------------------------------------

    async def snapshot_create(
        self, name: str, tag: str, *, memory: bool | None
    ) -> snapshots.SnapshotResult:
        """Internal snapshot ``tag`` of every disk (and the RAM with ``memory``)."""
        return await snapshots.create(self, name, tag, memory)

    async def snapshot_rollback(
        self, name: str, tag: str, *, with_memory: bool, disks: Sequence[str]
    ) -> snapshots.SnapshotResult:
        """Put the disks ``disks`` (and the RAM of a live VM) back to snapshot ``tag``."""
        return await snapshots.rollback(self, name, tag, with_memory, disks)

    async def snapshot_delete(self, name: str, tag: str) -> snapshots.SnapshotResult:
        """Remove snapshot ``tag`` from the VM's disks (idempotent)."""
        return await snapshots.delete(self, name, tag)

    async def copy_disk(
        self, vm: str | None, source: Path, target: Path, *, linked: bool, size_gib: int | None
    ) -> None:
        """A linked or full copy of ``source``; a running ``vm`` keeps running meanwhile."""
        await snapshots.copy_disk(self, vm, source, target, linked=linked, size_gib=size_gib)
