"""Live migration with QEMU: the two halves a host runs, over the ``QemuDriver``'s VMs.

Target (``start_incoming`` then ``incoming_report``): launch the VM's QEMU with the same
hardware as the source plus ``-incoming defer``; with disks on host-local pools, start an NBD
server on the host's own address and export each such disk's (blank, same-size) block node
writable under the volume's name; then ``migrate-incoming tcp:<host>:<port>``. QEMU starts the
guest by itself once the RAM arrived (no ``-S``), which keeps the pause short; the NBD server
is stopped as soon as the guest runs here.

Source (``outgoing``, an async generator of progress reports): for each local disk,
``blockdev-add`` an NBD client node to the target's export and ``blockdev-mirror`` into it with
``copy-mode=write-blocking`` (after READY every guest write reaches the target before it
completes, so when QEMU pauses the guest for the switch-over, the target disk is exact); then
``migrate-set-parameters`` (downtime-limit, max-bandwidth) and ``migrate``; ``query-migrate``
is polled and reported. If RAM does not converge (remaining bytes stop shrinking while QEMU
expects a longer pause than allowed) the downtime limit is doubled, up to a cap (Proxmox does
the same). On ``completed`` the mirror jobs are cancelled (a READY mirror cancels cleanly,
nothing is left to copy) and the source QEMU quits: the guest runs on the target now, and a
paused copy must never be resumed here.

``cancel_outgoing`` is ``migrate_cancel`` plus cancelling the mirrors and removing the NBD
client nodes; the guest keeps running on the source. If QEMU had already completed, the
cancel is too late and says so (``completed``): the caller must roll forward.

A marker file ``<vm dir>/migration.json`` records the migration id, the role and the outcome,
so an agent that restarts mid-way resumes from what QEMU and the marker say (QEMU migrates on
while no agent watches).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from corral.agent.drivers.qemu.cmdline import VNC_BASE_PORT, build_argv
from corral.agent.drivers.qemu.driver import QemuDriver, _port_free
from corral.agent.drivers.qemu.handle import QemuHandle, StoredDisk
from corral.agent.drivers.qemu.process import launch
from corral.errors import DriverError
from corral.model import cpu_gap
from corral.model.migration import IncomingMigration, MigrationReport, OutgoingMigration

__all__ = ["MARKER_FILE", "Marker", "QemuMigrator"]

log = logging.getLogger(__name__)

MARKER_FILE = "migration.json"
_POLL_S = 0.25
_MIRROR_READY_TIMEOUT_S = 3600.0
# Downtime is raised when the remaining bytes did not reach a new low for this many polls.
_STALL_POLLS = 8
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Marker:
    id: str
    role: str
    state: str  # started | completed | cancelled | failed
    data: dict[str, Any]


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` now (QEMU binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _version_tuple(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in (text or "0").split("."))
    except ValueError:
        return (0,)


def _slot(index: int, disk: StoredDisk) -> int:
    return disk.slot if disk.slot is not None else index


async def _query(session: Any, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    reply = await session.execute(command, args)
    return reply if isinstance(reply, dict) else {}


def _ms(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


class QemuMigrator:
    """Migration operations on the VMs of one ``QemuDriver`` (see the module docstring)."""

    def __init__(self, driver: QemuDriver) -> None:
        self.driver = driver
        self._machines: set[str] | None = None

    # -- marker -------------------------------------------------------------------------------

    def _marker_path(self, name: str) -> Path:
        return self.driver._vm_dir(name) / MARKER_FILE

    def marker(self, name: str) -> Marker | None:
        """The VM's migration marker, None when there is none (or the VM is not here)."""
        try:
            doc = json.loads(self._marker_path(name).read_text(encoding="utf-8"))
            return Marker(str(doc["id"]), str(doc["role"]), str(doc["state"]), dict(doc))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_marker(self, name: str, **doc: Any) -> None:
        path = self._marker_path(name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        tmp.replace(path)

    def clear_marker(self, name: str) -> None:
        with contextlib.suppress(OSError, DriverError):
            self._marker_path(name).unlink(missing_ok=True)

    # -- target -------------------------------------------------------------------------------

    async def _supported_machines(self) -> set[str]:
        if self._machines is None:
            proc = await asyncio.create_subprocess_exec(
                self.driver.qemu_binary,
                "-machine",
                "help",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await proc.communicate()
            names: set[str] = set()
            for line in out.decode(errors="replace").splitlines()[1:]:
                if line.strip():
                    names.add(line.split()[0])
            self._machines = names
        return self._machines

    async def check_compatible(self, inc: IncomingMigration) -> None:
        """Refuse (DriverError saying why) a source this host's QEMU cannot take over."""
        accel, _ = await self.driver._accelerator()
        if inc.accel and inc.accel != accel:
            raise DriverError(
                f"cannot receive: the source runs the guest with {inc.accel}, this host with "
                f"{accel} (the CPU model would differ); pick a host with the same accelerator"
            )
        if accel == "kvm":
            gap = cpu_gap(inc.cpu, await self.driver.host_cpu())
            if gap is not None:
                raise DriverError(
                    f"cannot receive: the guest runs with -cpu host and this host does not "
                    f"match the source's CPU: {gap}"
                )
        machines = await self._supported_machines()
        if inc.machine not in machines and not any(m.startswith(inc.machine) for m in machines):
            raise DriverError(f"cannot receive: this host's QEMU has no machine type {inc.machine}")
        version = await self.driver._qemu_version()
        if _version_tuple(version) < _version_tuple(inc.qemu_version):
            raise DriverError(
                f"cannot receive: this host's QEMU {version} is older than the source's "
                f"{inc.qemu_version}"
            )

    async def start_incoming(self, name: str, inc: IncomingMigration, host: str) -> MigrationReport:
        """Launch the incoming QEMU of a defined VM and listen on ``host`` (idempotent for the
        same migration id while that QEMU lives)."""
        drv = self.driver
        marker = self.marker(name)
        handle = drv._get(name)
        if marker is not None and marker.id == inc.id and drv._alive(handle):
            return await self.incoming_report(name, inc.id)
        await self.check_compatible(inc)
        if drv._alive(handle):
            raise DriverError(
                f"vm {name} already has a running qemu on this host; it cannot receive the guest"
            )
        accel, _ = await drv._accelerator()
        version = await drv._qemu_version()
        if not _port_free(VNC_BASE_PORT + handle.vnc_display):
            handle = drv._patch(name, vnc_display=drv._pick_display(name))
        config = drv._handle_config(handle, accel)
        for stale in (config.qmp_socket, config.serial_socket):
            stale.unlink(missing_ok=True)
        argv = [*build_argv(config, binary=drv.qemu_binary), "-incoming", "defer"]
        pid = await launch(
            argv, pidfile=config.pidfile, log=drv._vm_dir(name) / "qemu.log", label=name
        )
        handle = drv._patch(
            name,
            power="running",
            pid=pid,
            started_at=inc.started_at or datetime.now(UTC),  # the guest's boot, not ours
            accel=accel,
            qemu_version=version,
            stop_message="",
        )
        session = await drv._session(handle)
        nbd_port: int | None = None
        volumes = {d.id: d.path for d in handle.disks if d.id}
        try:
            local = [
                (_slot(i, d), d) for i, d in enumerate(handle.disks) if d.id in inc.local_volumes
            ]
            if local:
                nbd_port = _free_port(host)
                await session.execute(
                    "nbd-server-start",
                    {"addr": {"type": "inet", "data": {"host": host, "port": str(nbd_port)}}},
                )
                for slot, disk in local:
                    await session.execute(
                        "block-export-add",
                        {
                            "type": "nbd",
                            "id": f"mig-{disk.id}",
                            "node-name": f"disk{slot}",
                            "name": disk.id,
                            "writable": True,
                        },
                    )
            port = _free_port(host)
            uri = f"tcp:{host}:{port}"
            await session.execute("migrate-incoming", {"uri": uri})
        except DriverError:
            await drv._reap(name, "")
            raise
        self._write_marker(
            name,
            id=inc.id,
            role="target",
            state="started",
            uri=uri,
            nbd_host=host if nbd_port else None,
            nbd_port=nbd_port,
        )
        log.info("vm %s: incoming migration %s listening on %s", name, inc.id[:8], uri)
        return MigrationReport(
            id=inc.id,
            role="target",
            status="listening",
            uri=uri,
            nbd_host=host if nbd_port else None,
            nbd_port=nbd_port,
            volumes=volumes,
            message=f"listening on {uri}",
        )

    async def incoming_report(self, name: str, migration_id: str) -> MigrationReport:
        """The target's side now: listening, completed (the guest runs here) or failed."""
        drv = self.driver
        marker = self.marker(name)
        handle = drv._handles.get(name)
        if marker is None or marker.id != migration_id or handle is None:
            return MigrationReport(
                id=migration_id, role="target", status="preparing", message="not started yet"
            )
        base = MigrationReport(
            id=migration_id,
            role="target",
            status="listening",
            uri=marker.data.get("uri"),
            nbd_host=marker.data.get("nbd_host"),
            nbd_port=marker.data.get("nbd_port"),
            volumes={d.id: d.path for d in handle.disks if d.id},
        )
        if not drv._alive(handle):
            return base.model_copy(
                update={"status": "failed", "message": self._qemu_log_tail(name)}
            )
        status = await (await drv._session(handle)).status()
        if status == "inmigrate":
            return base
        if status in ("running", "paused"):
            if marker.state != "completed":
                if marker.data.get("nbd_port"):
                    with contextlib.suppress(DriverError):
                        await (await drv._session(handle)).execute("nbd-server-stop")
                self._write_marker(name, **{**marker.data, "state": "completed"})
            return base.model_copy(
                update={"status": "completed", "message": "the guest runs on this host"}
            )
        return base.model_copy(update={"status": "failed", "message": f"qemu reports {status}"})

    def _qemu_log_tail(self, name: str) -> str:
        path = self.driver._vm_dir(name) / "qemu.log"
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            lines = []
        last = lines[-1] if lines else ""
        return "the incoming qemu exited" + (f": {last}" if last else "")

    # -- source -------------------------------------------------------------------------------

    def _local_slots(self, handle: QemuHandle, volumes: list[str]) -> list[tuple[int, str]]:
        return [(_slot(i, d), d.id) for i, d in enumerate(handle.disks) if d.id in set(volumes)]

    async def outgoing(
        self, name: str, out: OutgoingMigration, top_only: set[str]
    ) -> AsyncIterator[MigrationReport]:
        """Send the VM to the target, yielding progress until it completed, failed or was
        cancelled (resumes a migration a previous agent started)."""
        drv = self.driver
        handle = drv._get(name)
        marker = self.marker(name)

        def report(status: str, **fields: Any) -> MigrationReport:
            return MigrationReport(id=out.id, role="source", status=status, **fields)  # type: ignore[arg-type]

        if marker is not None and marker.id == out.id and marker.state == "completed":
            yield report("completed", **marker.data.get("stats", {}))
            return
        if not drv._alive(handle):
            yield report("failed", message="the vm's qemu is not running on the source")
            return
        session = await drv._session(handle)
        info = await _query(session, "query-migrate")
        state = info.get("status")
        started = marker is not None and marker.id == out.id
        if not started or state not in ("setup", "active", "device", "completed", "pre-switchover"):
            if started and state in ("failed", "cancelled"):
                yield report("failed", message=str(info.get("error-desc", f"qemu {state}")))
                return
            self._write_marker(name, id=out.id, role="source", state="started")
            slots = self._local_slots(handle, out.local_volumes)
            if slots:
                async for r in self._mirror(name, out, slots, top_only):
                    yield r
            limit = out.max_downtime_ms
            params: dict[str, Any] = {"downtime-limit": limit}
            params["max-bandwidth"] = (out.bandwidth_mib_s or 0) * _MIB or 1 << 40
            await session.execute("migrate-set-parameters", params)
            await session.execute("migrate", {"uri": out.uri})
        limit = out.max_downtime_ms
        best: int | None = None
        stalled = 0
        while True:
            info = await _query(session, "query-migrate")
            state = str(info.get("status", "none"))
            ram = info.get("ram") or {}
            fields: dict[str, Any] = {
                "transferred_bytes": int(ram.get("transferred", 0)),
                "remaining_bytes": int(ram.get("remaining", 0)),
                "total_bytes": int(ram.get("total", 0)),
                "dirty_pages_rate": int(ram.get("dirty-pages-rate", 0)),
                "expected_downtime_ms": _ms(info.get("expected-downtime")),
                "downtime_limit_ms": limit,
            }
            if state == "completed":
                fields["downtime_ms"] = _ms(info.get("downtime"))
                fields["total_time_ms"] = _ms(info.get("total-time"))
                fields["remaining_bytes"] = 0
                await self._finish_source(name, out)
                self._write_marker(name, id=out.id, role="source", state="completed", stats=fields)
                yield report("completed", message=f"the guest runs on {out.target}", **fields)
                return
            if state in ("failed", "cancelled"):
                await self._drop_mirrors(name, out)
                self._write_marker(name, id=out.id, role="source", state=state)
                why = str(info.get("error-desc", f"qemu reports the migration {state}"))
                yield report("failed" if state == "failed" else "cancelled", message=why, **fields)
                return
            remaining = fields["remaining_bytes"]
            dirty_syncs = int(ram.get("dirty-sync-count", 0))
            if best is None or remaining < best:
                best, stalled = remaining, 0
            elif dirty_syncs >= 2:
                stalled += 1
            expected = fields["expected_downtime_ms"] or 0
            message = ""
            if stalled >= _STALL_POLLS and expected > limit and limit < out.max_downtime_cap_ms:
                limit = min(limit * 2, out.max_downtime_cap_ms)
                await session.execute("migrate-set-parameters", {"downtime-limit": limit})
                stalled, best = 0, None
                message = f"not converging: max downtime raised to {limit} ms"
                log.info("vm %s: %s", name, message)
            fields["downtime_limit_ms"] = limit
            yield report("active", message=message, **fields)
            await asyncio.sleep(_POLL_S)

    async def _mirror(
        self, name: str, out: OutgoingMigration, slots: list[tuple[int, str]], top_only: set[str]
    ) -> AsyncIterator[MigrationReport]:
        session = await self.driver._session(self.driver._get(name))
        if not out.nbd_host or not out.nbd_port:
            raise DriverError(f"vm {name}: local disks to migrate but no NBD server on the target")
        jobs = {j.get("device") for j in await self._jobs(name)}
        for slot, volume in slots:
            job = f"mig-{volume}"
            if job in jobs:
                continue
            nodes = await session.execute("query-named-block-nodes", {"flat": True})
            names = (
                {n.get("node-name") for n in nodes if isinstance(n, dict)}
                if isinstance(nodes, list)
                else set()
            )
            if job not in names:
                await session.execute(
                    "blockdev-add",
                    {
                        "driver": "nbd",
                        "node-name": job,
                        "server": {"type": "inet", "host": out.nbd_host, "port": str(out.nbd_port)},
                        "export": volume,
                    },
                )
            await session.execute(
                "blockdev-mirror",
                {
                    "job-id": job,
                    "device": f"disk{slot}",
                    "target": job,
                    "sync": "top" if volume in top_only else "full",
                    "copy-mode": "write-blocking",
                },
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _MIRROR_READY_TIMEOUT_S
        while True:
            jobs_now = [
                j for j in await self._jobs(name) if str(j.get("device", "")).startswith("mig-")
            ]
            done = sum(int(j.get("offset", 0)) for j in jobs_now)
            total = sum(int(j.get("len", 0)) for j in jobs_now)
            if len(jobs_now) < len(slots):
                raise DriverError(f"vm {name}: a disk mirror ended early (see qemu.log)")
            if all(j.get("ready") for j in jobs_now):
                yield MigrationReport(
                    id=out.id,
                    role="source",
                    status="mirroring",
                    message="disks in sync; moving memory",
                    disk_transferred_bytes=done,
                    disk_total_bytes=total,
                )
                return
            if loop.time() > deadline:
                raise DriverError(f"vm {name}: disk mirrors not in sync after an hour")
            yield MigrationReport(
                id=out.id,
                role="source",
                status="mirroring",
                message=f"copying disks: {done // _MIB} of {total // _MIB} MiB",
                disk_transferred_bytes=done,
                disk_total_bytes=total,
            )
            await asyncio.sleep(_POLL_S)

    async def _jobs(self, name: str) -> list[dict[str, Any]]:
        session = await self.driver._session(self.driver._get(name))
        jobs = await session.execute("query-block-jobs")
        return [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []

    async def _drop_mirrors(self, name: str, out: OutgoingMigration) -> None:
        """Cancel the disk mirrors and remove their NBD client nodes (errors are logged)."""
        drv = self.driver
        handle = drv._get(name)
        if not drv._alive(handle):
            return
        session = await drv._session(handle)
        for volume in out.local_volumes:
            job = f"mig-{volume}"
            with contextlib.suppress(DriverError):
                await session.execute("block-job-cancel", {"device": job, "force": True})
            for _ in range(40):
                if not any(j.get("device") == job for j in await self._jobs(name)):
                    break
                await asyncio.sleep(0.05)
            with contextlib.suppress(DriverError):
                await session.execute("blockdev-del", {"node-name": job})

    async def _finish_source(self, name: str, out: OutgoingMigration) -> None:
        """The guest runs on the target: stop the mirrors and make the paused copy go."""
        with contextlib.suppress(DriverError):
            await self._drop_mirrors(name, out)
        await self.driver._reap(name, f"migrated to {out.target}")

    async def cancel_outgoing(self, name: str, migration_id: str) -> MigrationReport:
        """Stop an outgoing migration; the guest keeps running here. Returns ``cancelled``, or
        ``completed`` when QEMU had finished already (too late: the guest runs on the target)."""
        drv = self.driver
        marker = self.marker(name)
        if marker is not None and marker.id == migration_id and marker.state == "completed":
            stats = marker.data.get("stats", {})
            return MigrationReport(id=migration_id, role="source", status="completed", **stats)
        handle = drv._get(name)
        target = str(marker.data.get("target", "")) if marker else ""
        out = OutgoingMigration(
            id=migration_id,
            target=target or "?",
            uri="",
            local_volumes=[d.id for d in handle.disks if d.id],
        )
        if drv._alive(handle):
            session = await drv._session(handle)
            info = await _query(session, "query-migrate")
            state = info.get("status")
            if state in ("setup", "active", "device", "pre-switchover"):
                await session.execute("migrate_cancel")
                for _ in range(200):
                    info = await _query(session, "query-migrate")
                    state = info.get("status")
                    if state not in ("setup", "active", "device", "pre-switchover", "cancelling"):
                        break
                    await asyncio.sleep(0.05)
            if state == "completed":
                await self._finish_source(name, out)
                self._write_marker(name, id=migration_id, role="source", state="completed")
                return MigrationReport(id=migration_id, role="source", status="completed")
            await self._drop_mirrors(name, out)
            if await session.status() == "postmigrate":  # never resume a migrated-away copy
                raise DriverError(f"vm {name}: qemu is postmigrate; refusing to resume it")
        self.clear_marker(name)
        return MigrationReport(
            id=migration_id,
            role="source",
            status="cancelled",
            message="migration cancelled; the guest runs on this host",
        )
