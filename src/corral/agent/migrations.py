"""The node agent's half of live migration: one worker per VM whose assignment carries
``incoming`` (this host is the target) or ``outgoing`` (this host is the source).

Such VMs are *owned* by this module and left out of the normal reconcile diff, so the agent
never destroys, restarts or resumes a copy in the middle of a migration. A VM is owned while
its assignment has ``incoming`` / ``outgoing``, or while the driver's migration marker says
this host started sending it and the leader has not yet taken the ``outgoing`` back (a cancel
or a roll-back: the worker then cancels and hands the VM back to the normal reconcile), or
completed sending it (the copy here is gone; only the leader's switch-over, which removes this
host's assignment, ends that).

Workers are keyed by their goal (``in``/``out``/``cancel`` and the migration id): a change of
goal cancels the old worker (QEMU goes on by itself) and starts the new one, which resumes from
what QEMU and the marker say. Progress goes to the servers as ``VmObservation.migration``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Literal, Protocol

from corral.agent.drivers.base import DriverVm
from corral.errors import CorralError
from corral.model import Assignment
from corral.model.migration import IncomingMigration, MigrationReport, OutgoingMigration

__all__ = ["AgentMigrations", "Migrator", "MigratorMarker"]

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 1.0
_TARGET_POLL_S = 0.5
_RETRY_S = 1.0


class MigratorMarker(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def state(self) -> str: ...


class Migrator(Protocol):
    """What a driver offers for live migration (``QemuMigrator``)."""

    def marker(self, name: str) -> MigratorMarker | None: ...

    def clear_marker(self, name: str) -> None: ...

    async def start_incoming(
        self, name: str, inc: IncomingMigration, host: str
    ) -> MigrationReport: ...

    async def incoming_report(self, name: str, migration_id: str) -> MigrationReport: ...

    def outgoing(
        self, name: str, out: OutgoingMigration, top_only: set[str]
    ) -> AsyncIterator[MigrationReport]: ...

    async def cancel_outgoing(self, name: str, migration_id: str) -> MigrationReport: ...


Goal = tuple[str, str]  # ("in" | "out" | "cancel", migration id)
# (vm name, report) -> True once the servers took it.
Publish = Callable[[str, MigrationReport], Awaitable[bool]]
Define = Callable[[Assignment], Awaitable[DriverVm]]


class AgentMigrations:
    def __init__(
        self,
        node: str,
        migrator: Migrator | None,
        host: str,
        publish: Publish,
        define: Define,
        wake: Callable[[], None],
    ) -> None:
        self.node = node
        self._migrator = migrator
        self._host = host
        self._publish = publish
        self._define = define
        self._wake = wake
        self._workers: dict[str, tuple[Goal, asyncio.Task[None]]] = {}
        self.reports: dict[str, MigrationReport] = {}

    def _goal(self, a: Assignment) -> Goal | None:
        if a.outgoing is not None:
            return ("out", a.outgoing.id)
        if a.incoming is not None:
            return ("in", a.incoming.id)
        if self._migrator is None:
            return None
        marker = self._migrator.marker(a.vm)
        if marker is None:
            return None
        if marker.role == "source":
            return ("cancel", marker.id)
        # A target whose assignment no longer says incoming: switched over (or replaced).
        self._migrator.clear_marker(a.vm)
        return None

    def owned(self, desired: Mapping[str, Assignment]) -> set[str]:
        """The VMs this module drives now (start, change or stop their workers); the caller
        leaves them out of the normal diff."""
        owned: set[str] = set()
        for name, a in desired.items():
            goal = self._goal(a)
            if goal is None:
                continue
            owned.add(name)
            current = self._workers.get(name)
            if current is not None and current[0] == goal:
                continue
            if current is not None:
                current[1].cancel()
            if current is None or current[0][1] != goal[1]:
                self.reports.pop(name, None)
            task = asyncio.create_task(self._run(name, goal, a), name=f"migrate-{name}")
            self._workers[name] = (goal, task)
        for name in list(self._workers):
            if name not in owned:
                goal, task = self._workers.pop(name)
                if not task.done() and goal[0] != "cancel":
                    task.cancel()
                self.reports.pop(name, None)
        return owned

    async def close(self) -> None:
        tasks = [t for _, t in self._workers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers.clear()

    # -- workers ------------------------------------------------------------------------------

    async def _send(self, name: str, report: MigrationReport, *, reliable: bool = False) -> None:
        self.reports[name] = report
        while not await self._publish(name, report):
            if not reliable:
                return
            await asyncio.sleep(_RETRY_S)

    async def _run(self, name: str, goal: Goal, a: Assignment) -> None:
        kind, migration_id = goal
        role: Literal["source", "target"] = "target" if kind == "in" else "source"
        try:
            if self._migrator is None:
                raise CorralError("this host's driver cannot live-migrate")
            if kind == "in":
                assert a.incoming is not None
                await self._incoming(name, a, a.incoming)
            elif kind == "out":
                assert a.outgoing is not None
                await self._outgoing(name, a, a.outgoing)
            else:
                report = await self._migrator.cancel_outgoing(name, migration_id)
                log.info(
                    "node %s: vm %s migration %s: %s",
                    self.node,
                    name,
                    migration_id[:8],
                    report.status,
                )
                await self._send(name, report, reliable=True)
                self._wake()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported: the leader rolls back
            message = exc.detail if isinstance(exc, CorralError) else f"{type(exc).__name__}: {exc}"
            log.warning(
                "node %s: vm %s migration %s failed: %s",
                self.node,
                name,
                migration_id[:8],
                message,
                exc_info=not isinstance(exc, CorralError),
            )
            report = MigrationReport(id=migration_id, role=role, status="failed", message=message)
            await self._send(name, report, reliable=True)

    async def _incoming(self, name: str, a: Assignment, inc: IncomingMigration) -> None:
        assert self._migrator is not None
        await self._send(
            name,
            MigrationReport(
                id=inc.id, role="target", status="preparing", message="starting the incoming qemu"
            ),
        )
        await self._define(a)
        report = await self._migrator.start_incoming(name, inc, self._host)
        await self._send(name, report, reliable=True)
        while True:
            await asyncio.sleep(_TARGET_POLL_S)
            now = await self._migrator.incoming_report(name, inc.id)
            if now != self.reports.get(name):
                await self._send(name, now, reliable=now.status in ("completed", "failed"))
            if now.status == "failed":
                return

    async def _outgoing(self, name: str, a: Assignment, out: OutgoingMigration) -> None:
        assert self._migrator is not None
        top_only = {d.volume for d in a.disks if d.image is not None and not d.full_clone} & set(
            out.local_volumes
        )
        loop = asyncio.get_running_loop()
        last = 0.0
        async for report in self._migrator.outgoing(name, out, top_only):
            previous = self.reports.get(name)
            final = report.status in ("completed", "failed", "cancelled")
            changed = previous is None or previous.status != report.status or report.message
            if final or changed or loop.time() - last >= _PROGRESS_EVERY_S:
                last = loop.time()
                await self._send(name, report, reliable=final)
            else:
                self.reports[name] = report
            if final:
                log.info(
                    "node %s: vm %s migration %s %s: %s",
                    self.node,
                    name,
                    out.id[:8],
                    report.status,
                    report.message,
                )
