"""The migration loop: live-migrates a VM between two hosts as a resumable, persisted protocol.

Design
------
A migration is a record at ``/corral/v1/migrations/<vm>`` (``model.migration.Migration``)
written by ``POST /vms/{name}/migrate`` together with its task. Its ``status.phase`` is the
only thing the leader advances; every decision is recomputed from that record, the VM, the
two assignments and the hosts' reports, so a new leader simply carries on (level-triggered).

Phases and what moves them:

1. ``pending`` -> ``preparing``: the leader checks the VM still runs on the source and the
   target is ready, then in one transaction writes the target's assignment for the VM with
   ``incoming`` (migration id, the source QEMU's machine / accelerator / version, the volumes
   on host-local pools) and marks the VM ``migrating``. The VM keeps one placement (``node``,
   ``epoch``) all along: the source's.
2. The target agent defines the VM (creating blank or same-backing files for local volumes),
   checks CPU compatibility (same accelerator, machine type available, QEMU not older; under
   KVM every CPU feature of the source host, which the leader copied from its inventory), starts
   QEMU with ``-incoming defer``, exports local disks over NBD and listens, all on its own
   address; it reports ``listening`` with the URI and NBD port in its observation.
   ``preparing`` -> ``migrating``: the leader adds ``outgoing`` (URI, NBD address, downtime,
   bandwidth) to the source's assignment.
3. The source agent mirrors local disks (``blockdev-mirror`` to the NBD exports, write-
   blocking) until in sync, then migrates RAM; it reports ``query-migrate`` progress, which the
   leader copies into the task (transferred, remaining, dirty rate, expected downtime). QEMU's
   downtime limit is doubled when RAM does not converge, up to a cap.
4. Switch-over, on the source's ``completed`` (its QEMU has quit; the guest runs on the
   target): one transaction moves the VM to the target (``node``, ``epoch + 1``), moves the
   local volumes' records (``node``, ``path``), rewrites the target's assignment without
   ``incoming`` (new epoch), deletes the source's assignment, finishes the task with QEMU's
   downtime and total time, and sets ``switched-over``. The epoch thus moves only here.
5. ``switched-over`` -> ``succeeded``: the source's copies of local volumes are deleted through
   that host's storage API (retried until the host answers).

Cancel (``corral task cancel``), a failure reported by either host, or the timeout move a
migration that has not switched over to ``rolling-back``: the source's assignment loses
``outgoing`` (the source agent runs ``migrate_cancel``, cancels the mirrors, keeps the guest
running and reports ``cancelled``); only once the source confirmed (or never started) is the
target's assignment deleted (its agent quits the incoming QEMU) and the target's local volume
files removed. If the source reports ``completed`` while rolling back, the cancel came too late
and the leader rolls forward (switch-over) instead.

Why never two running copies or none: the target QEMU runs the guest only after the source
QEMU completed (QEMU's own hand-over), the source agent quits the source QEMU right then and
never resumes a QEMU in ``postmigrate`` (the driver refuses), and the target is cleaned only
after the source said it keeps the guest. Agents act on their assignments and the VMs stay out
of the normal reconcile while a migration owns them, so a leader dying at any point leaves a
state the next leader (or the same agents, restarted) resumes from.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from corral.control.context import LeaderContext
from corral.control.hostcall import call_host_storage
from corral.control.placement import Allocation, PlanApplier, fits
from corral.control.queue import Outcome
from corral.control.tasks import steps_for
from corral.control.vms import assigned_disk, desired_assignment
from corral.errors import CorralError
from corral.model import (
    Assignment,
    HostCpu,
    Migration,
    Target,
    Task,
    TaskSpec,
    TaskStatus,
    Vm,
    new_id,
)
from corral.model.common import new_time_id, utcnow
from corral.model.migration import (
    IncomingMigration,
    MigrationOptions,
    MigrationReport,
    MigrationSpec,
    OutgoingMigration,
)
from corral.state import Delete, Expect, Objects, Put, keys
from corral.state.codec import encode

__all__ = ["MigrationLoop", "migration_records", "progress_step"]

log = logging.getLogger(__name__)

_WAIT_S = 1.0
# Rolling back after ``outgoing`` was sent, the source is waited for this long when it never
# reported anything about this migration (it then never started it).
_SILENT_SOURCE_S = 30.0
_MIB = 1024 * 1024

_STEP_INDEX = {"preparing": 1, "migrating": 2, "switched-over": 4}


def _mib(n: int) -> str:
    return f"{n / _MIB:.0f} MiB"


def progress_step(report: MigrationReport | None) -> tuple[str, float]:
    """The task's step sentence and progress fraction from the source's report. Pure."""
    if report is None or report.status in ("preparing", "listening"):
        return "starting the transfer", 0.4
    if report.status == "mirroring":
        total = max(report.disk_total_bytes, 1)
        done = report.disk_transferred_bytes / total
        return (
            f"copying local disks: {_mib(report.disk_transferred_bytes)} of "
            f"{_mib(report.disk_total_bytes)}",
            0.4 + 0.2 * done,
        )
    sent = report.transferred_bytes
    left = report.remaining_bytes
    fraction = sent / max(sent + left, 1)
    parts = [
        f"transferring memory: {_mib(sent)} sent, {_mib(left)} remaining",
        f"dirty rate {report.dirty_pages_rate} pages/s",
    ]
    if report.expected_downtime_ms is not None:
        parts.append(f"expected downtime {report.expected_downtime_ms} ms")
    if report.downtime_limit_ms is not None:
        parts.append(f"limit {report.downtime_limit_ms} ms")
    step = ", ".join(parts)
    if report.message:
        step += f" ({report.message})"
    return step, 0.6 + 0.2 * min(fraction, 1.0)


def migration_records(
    vm: Vm,
    target: str,
    options: MigrationOptions,
    local_volumes: list[str],
    why: str,
    previous: Migration | None,
    *,
    actor: str,
    request_id: str = "",
    trace_id: str = "",
    cpu: HostCpu | None = None,
) -> tuple[Migration, Task, list[Put | Delete], list[Expect]]:
    """A new migration of running ``vm`` to ``target`` and its ``migrate`` task, with the ops
    and compares that write both in one transaction (the VM unchanged, no migration under way).
    The one place both ``POST /vms/{name}/migrate`` and the live mover of drains and rebalances
    build them."""
    source = vm.status.node
    assert source is not None
    now = utcnow()
    task_id = new_time_id()
    steps = steps_for("migrate")
    steps[0].state = "done"
    steps[0].started_at = steps[0].finished_at = now
    task = Task(
        name=task_id,
        id=task_id,
        created_at=now,
        updated_at=now,
        spec=TaskSpec(
            action="migrate",
            target=Target(kind="vm", name=vm.name),
            params={
                "vm_id": vm.id,
                "source": source,
                "target": target,
                **options.model_dump(exclude_none=True),
            },
        ),
        status=TaskStatus(
            state="pending", step="accepted", steps=steps, progress=round(1 / len(steps), 3)
        ),
        actor=actor,
        request_id=request_id,
        trace_id=trace_id,
        deadline_at=now + timedelta(seconds=options.timeout_s + 120),
    )
    runtime = vm.status.runtime
    mode = "memory and local disks (mirrored over NBD)" if local_volumes else "memory only"
    migration = Migration(
        name=vm.name,
        id=new_id(),
        created_at=now,
        updated_at=now,
        spec=MigrationSpec(
            vm=vm.name,
            vm_id=vm.id,
            source=source,
            target=target,
            task=task.id,
            options=options,
            local_volumes=list(local_volumes),
            machine=runtime.get("qemu.machine", "q35"),
            accel=runtime.get("qemu.accel"),
            qemu_version=runtime.get("qemu.version"),
            cpu=cpu if runtime.get("qemu.accel") == "kvm" else None,
        ),
    )
    migration.status.message = f"accepted: {why}; transfer: {mode}"
    expect = [
        Objects.expect_unchanged(vm),
        Objects.expect_unchanged(previous)
        if previous is not None
        else Objects.expect_missing(Migration, vm.name),
    ]
    return migration, task, [Objects.put(migration), Objects.put(task)], expect


def _task_progress(task: Task, done: int, step: str, progress: float) -> None:
    now = utcnow()
    st = task.status
    st.state = "running"
    st.started_at = st.started_at or now
    for i, s in enumerate(st.steps):
        if i < done and s.state != "done":
            s.state = "done"
            s.started_at = s.started_at or now
            s.finished_at = now
        elif i == done and s.state == "pending":
            s.state = "running"
            s.started_at = now
    st.step = step
    st.progress = round(progress, 3)
    task.updated_at = now


def _task_finish(task: Task, state: str, step: str, error: str | None = None) -> None:
    now = utcnow()
    st = task.status
    for s in st.steps:
        if state == "succeeded" and s.state != "done":
            s.state = "done"
            s.started_at = s.started_at or now
            s.finished_at = now
        elif s.state == "running":
            s.state = "failed" if state == "failed" else "skipped"
            s.finished_at = now
    st.state = state  # type: ignore[assignment]
    st.step = step
    st.error = error
    st.finished_at = now
    st.started_at = st.started_at or now
    if state == "succeeded":
        st.progress = 1.0
    task.updated_at = now


class MigrationLoop:
    def __init__(self, ctx: LeaderContext) -> None:
        self.ctx = ctx

    async def reconcile(self, name: str) -> Outcome:
        m = self.ctx.migration(name)
        if m is None or m.final:
            return Outcome()
        vm = self.ctx.vm(name)
        task = self.ctx.task(m.spec.task)
        if vm is None or vm.id != m.spec.vm_id:
            return await self._rollback(m, vm, task, f"vm {name} was deleted")
        phase = m.status.phase
        if phase == "switched-over":
            return await self._clean_source(m, task)
        if phase == "rolling-back":
            return await self._rollback(m, vm, task, m.status.rollback_reason or "rolled back")
        source, target = m.status.source, m.status.target
        if source is not None and source.id == m.id and source.status == "completed":
            return await self._switch_over(m, vm, task)
        reason = self._abort_reason(m)
        if reason is not None:
            return await self._rollback(m, vm, task, reason)
        if phase == "pending":
            return await self._prepare(m, vm, task)
        if phase == "preparing":
            if target is not None and target.id == m.id and target.status == "listening":
                return await self._send(m, vm, task)
            return Outcome(requeue_after=_WAIT_S)
        return await self._follow(m, task)

    def _abort_reason(self, m: Migration) -> str | None:
        if m.status.cancel_requested:
            return "cancelled on request"
        for side in (m.status.source, m.status.target):
            if side is not None and side.id == m.id and side.status in ("failed", "cancelled"):
                host = m.spec.source if side.role == "source" else m.spec.target
                return f"{side.role} host {host}: {side.message or side.status}"
        started = m.status.started_at or m.created_at
        if utcnow() >= started + timedelta(seconds=m.spec.options.timeout_s):
            return f"timed out after {m.spec.options.timeout_s} s"
        return None

    # -- forward ------------------------------------------------------------------------------

    async def _prepare(self, m: Migration, vm: Vm, task: Task | None) -> Outcome:
        problem = None
        target = self.ctx.node(m.spec.target)
        if vm.status.node != m.spec.source:
            problem = f"vm {vm.name} no longer runs on {m.spec.source}"
        elif vm.status.state not in ("running", "paused", "migrating"):
            problem = f"vm {vm.name} is {vm.status.state}; only a running vm migrates live"
        elif target is None or target.status.state != "ready":
            state = target.status.state if target else "gone"
            problem = f"target host {m.spec.target} is {state}"
        elif target.spec.cordoned or target.spec.maintenance:
            what = "in maintenance" if target.spec.maintenance else "cordoned"
            problem = f"target host {m.spec.target} is {what}"
        else:
            problem = self._target_full(m, vm)
        if problem is not None:
            return await self._end(m, vm, task, "failed", problem, ops=[])
        assignment = desired_assignment(vm, self.ctx)
        disks = [
            d.model_copy(update={"created_on": None}) if d.volume in m.spec.local_volumes else d
            for d in assignment.disks
        ]
        incoming = assignment.model_copy(
            update={
                "node": m.spec.target,
                "disks": disks,
                "incoming": IncomingMigration(
                    id=m.id,
                    source=m.spec.source,
                    machine=m.spec.machine,
                    accel=m.spec.accel,
                    qemu_version=m.spec.qemu_version,
                    cpu=m.spec.cpu,
                    local_volumes=list(m.spec.local_volumes),
                    started_at=vm.status.started_at,
                ),
            }
        )
        now = utcnow()
        m.status.phase = "preparing"
        m.status.started_at = now
        m.status.message = f"starting an incoming qemu on {m.spec.target}"
        m.updated_at = now
        vm.status.state = "migrating"
        vm.status.message = f"migrating to {m.spec.target}"
        vm.updated_at = now
        ops: list[Put | Delete] = [
            Objects.put(m),
            Objects.put(vm),
            Put(keys.assign_key(m.spec.target, vm.name), encode("assignment", incoming)),
        ]
        if task is not None:
            _task_progress(task, 1, f"preparing target {m.spec.target}", 0.2)
            ops.append(Objects.put(task))
        await self.ctx.commit(ops, [Objects.expect_unchanged(m), Objects.expect_unchanged(vm)])
        return Outcome(
            f"migration of vm {vm.name}: preparing target {m.spec.target}", requeue_after=_WAIT_S
        )

    def _target_full(self, m: Migration, vm: Vm) -> str | None:
        """Why the target cannot take the VM now (its allocation record plus the migrations
        already heading there), or None."""
        target = self.ctx.node(m.spec.target)
        assert target is not None
        applier = PlanApplier(self.ctx)
        trial = applier.allocation(m.spec.target)
        for other in self.ctx.all(Migration):
            if other.name == m.name or other.spec.target != m.spec.target:
                continue
            if other.final or other.status.phase in ("pending", "switched-over"):
                continue
            moving = self.ctx.vm(other.name)
            if moving is not None:
                trial.vms[moving.name] = (moving.spec.vcpus, moving.spec.memory_mib)
        trial.vms[vm.name] = (vm.spec.vcpus, vm.spec.memory_mib)
        return fits(target, trial, applier.ratios())

    async def _send(self, m: Migration, vm: Vm, task: Task | None) -> Outcome:
        target = m.status.target
        assert target is not None and target.uri is not None
        have = self.ctx.assignment(m.spec.source, vm.name)
        if have is None:
            return await self._rollback(m, vm, task, "the source assignment vanished")
        opts = m.spec.options
        outgoing = have[0].model_copy(
            update={
                "outgoing": OutgoingMigration(
                    id=m.id,
                    target=m.spec.target,
                    uri=target.uri,
                    nbd_host=target.nbd_host,
                    nbd_port=target.nbd_port,
                    local_volumes=list(m.spec.local_volumes),
                    max_downtime_ms=opts.max_downtime_ms,
                    max_downtime_cap_ms=max(opts.max_downtime_cap_ms, opts.max_downtime_ms),
                    bandwidth_mib_s=opts.bandwidth_mib_s,
                )
            }
        )
        now = utcnow()
        m.status.phase = "migrating"
        m.status.outgoing_at = now
        m.status.message = f"sending to {target.uri}"
        m.updated_at = now
        ops: list[Put | Delete] = [
            Objects.put(m),
            Put(keys.assign_key(m.spec.source, vm.name), encode("assignment", outgoing)),
        ]
        if task is not None:
            _task_progress(task, 2, f"target listening on {target.uri}; starting the transfer", 0.4)
            ops.append(Objects.put(task))
        await self.ctx.commit(ops, [Objects.expect_unchanged(m)])
        return Outcome(f"migration of vm {vm.name}: sending to {target.uri}", requeue_after=_WAIT_S)

    async def _follow(self, m: Migration, task: Task | None) -> Outcome:
        if task is None or task.final:
            return Outcome(requeue_after=_WAIT_S)
        step, progress = progress_step(m.status.source)
        if step != task.status.step:
            _task_progress(task, 2, step, progress)
            await self.ctx.commit([Objects.put(task)], [Objects.expect_unchanged(task)])
        return Outcome(requeue_after=_WAIT_S)

    async def _switch_over(self, m: Migration, vm: Vm, task: Task | None) -> Outcome:
        source = m.status.source
        assert source is not None
        target_report = m.status.target
        now = utcnow()
        ops: list[Put | Delete] = []
        expect = [Objects.expect_unchanged(m), Objects.expect_unchanged(vm)]
        for name in m.spec.local_volumes:
            volume = self.ctx.volume(name)
            if volume is None:
                continue
            volume.status.node = m.spec.target
            path = (target_report.volumes if target_report else {}).get(name)
            if path:
                volume.status.path = path
            volume.updated_at = now
            ops.append(Objects.put(volume))
            expect.append(Objects.expect_unchanged(volume))
        vm.status.node = m.spec.target
        vm.status.epoch += 1
        vm.status.state = "paused" if vm.spec.power_state == "paused" else "running"
        vm.status.message = f"migrated from {m.spec.source}"
        vm.status.runtime = {}
        vm.updated_at = now
        assignment = desired_assignment(vm, self.ctx)
        disks = [
            d.model_copy(update={"created_on": m.spec.target})
            if d.volume in m.spec.local_volumes
            else d
            for d in assignment.disks
        ]
        assignment = assignment.model_copy(update={"disks": disks})
        # The VM's allocation moves with it, in this transaction: capacity stays exact.
        applier = PlanApplier(self.ctx)
        allocs: dict[str, Allocation] = {}
        for host in (m.spec.source, m.spec.target):
            alloc = applier.allocation(host)
            expect.append(alloc.expect(host))
            allocs[host] = alloc
        allocs[m.spec.source].vms.pop(vm.name, None)
        allocs[m.spec.target].vms[vm.name] = (vm.spec.vcpus, vm.spec.memory_mib)
        m.status.phase = "switched-over"
        m.status.switched_at = now
        m.status.message = f"the guest runs on {m.spec.target}"
        m.updated_at = now
        ops += [
            Objects.put(m),
            Objects.put(vm),
            Put(keys.assign_key(m.spec.target, vm.name), encode("assignment", assignment)),
        ]
        if self.ctx.assignment(m.spec.source, vm.name) is not None:
            ops.append(Delete(keys.assign_key(m.spec.source, vm.name)))
        ops += [Put(keys.alloc_key(h), a.encode()) for h, a in allocs.items()]
        if task is not None:
            task.status.result = {
                "source": m.spec.source,
                "target": m.spec.target,
                "downtime_ms": source.downtime_ms,
                "total_time_ms": source.total_time_ms,
                "transferred_bytes": source.transferred_bytes,
                "local_volumes": list(m.spec.local_volumes),
                "max_downtime_ms": source.downtime_limit_ms,
            }
            _task_finish(
                task,
                "succeeded",
                f"vm {vm.name} runs on {m.spec.target} (downtime {source.downtime_ms} ms, "
                f"total {source.total_time_ms} ms)",
            )
            ops.append(Objects.put(task))
        await self.ctx.commit(ops, expect)
        return Outcome(
            f"migration of vm {vm.name}: switched over to {m.spec.target} "
            f"(epoch {vm.status.epoch}, downtime {source.downtime_ms} ms)",
            requeue_after=0.1,
        )

    async def _delete_files(self, node_name: str, volumes: list[str]) -> None:
        node = self.ctx.node(node_name)
        if node is None:
            return
        for name in volumes:
            volume = self.ctx.volume(name)
            if volume is None:
                continue
            pool = self.ctx.pool(volume.spec.pool)
            disk = assigned_disk(volume, pool, None)
            await call_host_storage(node, {"op": "delete", "disk": disk.model_dump(mode="json")})

    async def _clean_source(self, m: Migration, task: Task | None) -> Outcome:
        if m.spec.local_volumes:
            try:
                await self._delete_files(m.spec.source, m.spec.local_volumes)
            except CorralError as exc:
                m.status.message = f"removing the source's copies of local volumes: {exc}"
                if m.status.message != (self.ctx.migration(m.spec.vm) or m).status.message:
                    await self.ctx.commit([Objects.put(m)], [Objects.expect_unchanged(m)])
                return Outcome(str(exc), requeue_after=10.0)
        m.status.phase = "succeeded"
        m.status.finished_at = utcnow()
        m.status.message = f"the guest runs on {m.spec.target}"
        m.updated_at = utcnow()
        await self.ctx.commit([Objects.put(m)], [Objects.expect_unchanged(m)])
        return Outcome(f"migration of vm {m.spec.vm} to {m.spec.target} finished")

    # -- backward -----------------------------------------------------------------------------

    async def _rollback(
        self, m: Migration, vm: Vm | None, task: Task | None, reason: str
    ) -> Outcome:
        now = utcnow()
        if m.status.phase != "rolling-back":
            m.status.phase = "rolling-back"
            m.status.rollback_reason = reason
            m.status.message = f"rolling back: {reason}"
            m.updated_at = now
            ops: list[Put | Delete] = [Objects.put(m)]
            if task is not None and not task.final:
                _task_progress(task, 2, f"rolling back: {reason}", task.status.progress)
                ops.append(Objects.put(task))
            await self.ctx.commit(ops, [Objects.expect_unchanged(m)])
            return Outcome(f"migration of vm {m.spec.vm}: rolling back: {reason}", 0.05)
        source = m.status.source
        completed = source is not None and source.id == m.id and source.status == "completed"
        if completed and vm is not None and vm.id == m.spec.vm_id:
            return await self._switch_over(m, vm, task)  # too late to cancel: roll forward
        have = self.ctx.assignment(m.spec.source, m.spec.vm)
        if have is not None and have[0].outgoing is not None:
            back: Assignment = have[0].model_copy(update={"outgoing": None})
            await self.ctx.commit(
                [Put(keys.assign_key(m.spec.source, m.spec.vm), encode("assignment", back))]
            )
            return Outcome(f"migration of vm {m.spec.vm}: asking the source to cancel", _WAIT_S)
        if m.status.outgoing_at is not None:
            confirmed = (
                source is not None
                and source.id == m.id
                and source.status in ("cancelled", "failed")
            )
            silent = source is None or source.id != m.id
            waited = now - m.status.outgoing_at >= timedelta(seconds=_SILENT_SOURCE_S)
            if not confirmed and not (silent and waited):
                return Outcome(requeue_after=_WAIT_S)
        ops = []
        if self.ctx.assignment(m.spec.target, m.spec.vm) is not None:
            ops.append(Delete(keys.assign_key(m.spec.target, m.spec.vm)))
            await self.ctx.commit(ops)
            return Outcome(f"migration of vm {m.spec.vm}: cleaning target {m.spec.target}", 0.5)
        if m.spec.local_volumes:
            try:
                await self._delete_files(m.spec.target, m.spec.local_volumes)
            except CorralError as exc:
                return Outcome(f"removing the target's copies: {exc}", requeue_after=5.0)
        state = "cancelled" if m.status.cancel_requested else "failed"
        return await self._end(m, vm, task, state, m.status.rollback_reason or reason, ops=[])

    async def _end(
        self,
        m: Migration,
        vm: Vm | None,
        task: Task | None,
        state: str,
        reason: str,
        *,
        ops: list[Put | Delete],
    ) -> Outcome:
        now = utcnow()
        m.status.phase = state  # type: ignore[assignment]
        m.status.finished_at = now
        m.status.message = reason
        m.updated_at = now
        ops = [*ops, Objects.put(m)]
        expect = [Objects.expect_unchanged(m)]
        if vm is not None and vm.id == m.spec.vm_id and vm.status.state == "migrating":
            vm.status.state = "running"
            vm.status.message = f"migration {state}: {reason}"
            vm.updated_at = now
            ops.append(Objects.put(vm))
            expect.append(Objects.expect_unchanged(vm))
        if task is not None and not task.final:
            where = m.spec.source
            _task_finish(task, state, f"vm {m.spec.vm} stays on {where}", error=reason)
            ops.append(Objects.put(task))
        await self.ctx.commit(ops, expect)
        return Outcome(f"migration of vm {m.spec.vm} {state}: {reason}")
