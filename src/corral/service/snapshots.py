"""VM snapshots: a record per snapshot in etcd, the work on the VM's host, a task for both.

``create``/``rollback``/``delete`` validate, write the snapshot record and its task in one
transaction, and then do the work through the VM's host (``POST /api/v1/local/vms``, see
``agent/vm_ops.py``) in the background (``spawn``; inline when there is none). The task says
how it went; the record changes only once the host did the work, so it never claims a snapshot
that is not in the files. Snapshots of one VM form a tree (``model/snapshot.py``).
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from corral.control.hostcall import call_host_vms
from corral.errors import Conflict, CorralError, NotFound
from corral.model import Node, Task, Vm, new_id, utcnow
from corral.model.snapshot import SnapshotCreate, SnapshotSpec, SnapshotStatus, VmSnapshot, key_name
from corral.service.context import RequestMeta, ServiceContext
from corral.service.tasks import new_task
from corral.service.validate import parse
from corral.state import Delete, Expect, Objects, Put

__all__ = ["SnapshotAccepted", "SnapshotService", "TaskRunner"]

log = logging.getLogger(__name__)

Spawn = Callable[[Awaitable[None]], None]


@dataclass(frozen=True)
class SnapshotAccepted:
    snapshot: VmSnapshot
    task: Task


class TaskRunner:
    """Moves a service-run task (``control.tasks.SERVICE_ACTIONS``) through its steps."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def step(self, task: Task, done: int, step: str) -> Task:
        """Steps before ``done`` are finished; ``step`` says what happens now."""
        now = utcnow()
        st = task.status.model_copy(deep=True)
        st.state = "running"
        st.started_at = st.started_at or now
        for i, s in enumerate(st.steps):
            if i < done and s.state != "done":
                s.state, s.started_at, s.finished_at = "done", s.started_at or now, now
            elif i == done and s.state == "pending":
                s.state, s.started_at = "running", now
        st.progress = round(done / max(len(st.steps), 1), 3)
        st.step = step
        return await self._save(task, st)

    async def finish(
        self, task: Task, *, error: str | None = None, result: dict[str, Any] | None = None
    ) -> Task:
        now = utcnow()
        st = task.status.model_copy(deep=True)
        st.state = "failed" if error else "succeeded"
        for s in st.steps:
            if s.state in ("pending", "running"):
                s.state = ("failed" if s.state == "running" else "skipped") if error else "done"
                s.started_at = s.started_at or now
                s.finished_at = now
        st.error, st.result = error, result
        st.progress = st.progress if error else 1.0
        st.step = f"failed: {error}" if error else "done"
        st.started_at = st.started_at or now
        st.finished_at = now
        return await self._save(task, st)

    async def _save(self, task: Task, status: Any) -> Task:
        current = await self.ctx.objects.find(Task, task.id) or task
        current.status = status
        current.updated_at = utcnow()
        current.mod_revision = await self.ctx.store.commit([Objects.put(current)])
        return current


class SnapshotService:
    def __init__(self, ctx: ServiceContext, *, spawn: Spawn | None = None) -> None:
        self.ctx = ctx
        self.spawn = spawn
        self.tasks = TaskRunner(ctx)

    # -- reads -----------------------------------------------------------------------------

    async def list(self, vm_name: str) -> tuple[builtins.list[VmSnapshot], int]:
        """The VM's snapshots, oldest first (each names its ``parent``: a tree)."""
        vm = await self.ctx.objects.get(Vm, vm_name)
        page = await self.ctx.objects.list(VmSnapshot, limit=1000, cursor=None)
        items = [s for s in page.items if s.spec.vm == vm_name and s.status.vm_id == vm.id]
        items.sort(key=lambda s: s.created_at)
        return items, page.revision

    async def get(self, vm_name: str, snapshot: str) -> VmSnapshot:
        vm = await self.ctx.objects.get(Vm, vm_name)
        snap = await self.ctx.objects.find(VmSnapshot, key_name(vm_name, snapshot))
        if snap is None or snap.status.vm_id != vm.id:
            raise NotFound(
                f"vm {vm_name!r} has no snapshot {snapshot!r}; see `corral vm snapshot ls "
                f"{vm_name}`"
            )
        return snap

    # -- writes ----------------------------------------------------------------------------

    async def _host(self, vm: Vm) -> Node:
        if vm.deleting:
            raise Conflict(f"vm {vm.name!r} is being deleted")
        if vm.status.node is None:
            raise Conflict(f"vm {vm.name!r} is not placed on a host yet; wait until it is")
        node = await self.ctx.objects.find(Node, vm.status.node)
        if node is None or node.status.state != "ready":
            state = node.status.state if node else "gone"
            raise Conflict(f"vm {vm.name!r} is on host {vm.status.node}, which is {state}")
        if not vm.spec.disks:
            raise Conflict(f"vm {vm.name!r} has no disks to snapshot")
        return node

    def _go(self, work: Awaitable[None]) -> Awaitable[None] | None:
        if self.spawn is None:
            return work
        self.spawn(work)
        return None

    async def create(self, vm_name: str, body: Any, meta: RequestMeta) -> SnapshotAccepted:
        req = parse(SnapshotCreate, body)
        vm = await self.ctx.objects.get(Vm, vm_name)
        node = await self._host(vm)
        key = key_name(vm_name, req.name)
        existing = await self.ctx.objects.find(VmSnapshot, key)
        expect: list[Expect] = [Objects.expect_missing(VmSnapshot, key)]
        if existing is not None:
            if existing.status.vm_id == vm.id:
                raise Conflict(f"vm {vm_name!r} already has a snapshot {req.name!r}")
            expect = [Objects.expect_unchanged(existing)]  # left by a deleted vm of that name
        now = utcnow()
        snap = VmSnapshot(
            name=key,
            id=new_id(),
            created_at=now,
            updated_at=now,
            spec=SnapshotSpec(
                vm=vm_name, snapshot=req.name, memory=req.memory, description=req.description
            ),
            status=SnapshotStatus(
                vm_id=vm.id, node=node.name, disks=[d.volume for d in vm.spec.disks]
            ),
        )
        task = new_task(
            self.ctx, meta, "snapshot-create", vm_name, {"snapshot": req.name, "vm_id": vm.id}
        )
        rev = await self.ctx.store.commit([Objects.put(snap), Objects.put(task)], expect)
        snap.create_revision = snap.mod_revision = task.mod_revision = rev
        op = {"op": "snapshot-create", "vm": vm_name, "tag": req.name, "memory": req.memory}
        inline = self._go(self._create(node, snap, task, op))
        if inline is not None:
            await inline
            snap = await self.ctx.objects.find(VmSnapshot, key) or snap
            task = await self.ctx.objects.get(Task, task.id)
        return SnapshotAccepted(snap, task)

    async def _create(self, node: Node, snap: VmSnapshot, task: Task, op: dict[str, Any]) -> None:
        task = await self.tasks.step(task, 1, f"snapshotting on host {node.name}")
        try:
            answer = await call_host_vms(node, op)
        except CorralError as exc:
            await self.ctx.store.commit([Objects.delete(VmSnapshot, snap.name)])
            await self.tasks.finish(task, error=exc.detail)
            return
        for _ in range(8):
            siblings, _rev = await self.list(snap.spec.vm)
            current = next((s for s in siblings if s.status.current and s.name != snap.name), None)
            mine = await self.ctx.objects.get(VmSnapshot, snap.name)
            mine.status.state = "ready"
            mine.status.with_memory = bool(answer.get("with_memory"))
            mine.status.vm_state = str(answer.get("vm_state", ""))
            mine.status.vm_state_bytes = int(answer.get("vm_state_bytes") or 0)
            mine.status.disk_bytes = int(answer.get("disk_bytes") or 0)
            mine.status.parent = current.spec.snapshot if current else None
            mine.status.current = True
            mine.updated_at = utcnow()
            ops: list[Put | Delete] = [Objects.put(mine)]
            expect = [Objects.expect_unchanged(mine)]
            if current is not None:
                current.status.current = False
                ops.append(Objects.put(current))
                expect.append(Objects.expect_unchanged(current))
            try:
                await self.ctx.store.commit(ops, expect)
            except Conflict:
                continue
            await self.tasks.finish(task, result={"snapshot": snap.spec.snapshot, **answer})
            return
        await self.tasks.finish(task, error="the snapshot records kept changing; list them")

    async def rollback(self, vm_name: str, snapshot: str, meta: RequestMeta) -> SnapshotAccepted:
        vm = await self.ctx.objects.get(Vm, vm_name)
        node = await self._host(vm)
        snap = await self.get(vm_name, snapshot)
        if snap.status.state != "ready":
            raise Conflict(f"snapshot {snapshot!r} is {snap.status.state}, not ready")
        if not snap.status.with_memory and vm.status.state not in ("stopped", "crashed"):
            raise Conflict(
                f"snapshot {snapshot!r} holds no memory and vm {vm_name!r} is {vm.status.state}: "
                f"stop it first (`corral vm stop {vm_name}`), then roll back"
            )
        snap.status.state = "rolling-back"
        snap.updated_at = utcnow()
        task = new_task(
            self.ctx, meta, "snapshot-rollback", vm_name, {"snapshot": snapshot, "vm_id": vm.id}
        )
        rev = await self.ctx.store.commit(
            [Objects.put(snap), Objects.put(task)], [Objects.expect_unchanged(snap)]
        )
        snap.mod_revision = task.mod_revision = rev
        op = {
            "op": "snapshot-rollback",
            "vm": vm_name,
            "tag": snapshot,
            "with_memory": snap.status.with_memory,
            "disks": snap.status.disks,
        }
        inline = self._go(self._rollback(node, snap, task, op))
        if inline is not None:
            await inline
            snap = await self.get(vm_name, snapshot)
            task = await self.ctx.objects.get(Task, task.id)
        return SnapshotAccepted(snap, task)

    async def _rollback(self, node: Node, snap: VmSnapshot, task: Task, op: dict[str, Any]) -> None:
        task = await self.tasks.step(task, 1, f"rolling back on host {node.name}")
        error: str | None = None
        answer: dict[str, Any] = {}
        try:
            answer = await call_host_vms(node, op)
        except CorralError as exc:
            error = exc.detail
        siblings, _rev = await self.list(snap.spec.vm)
        ops: list[Put | Delete] = []
        for s in siblings:
            if s.name == snap.name:
                s.status.state = "ready"
                s.status.current = s.status.current if error else True
            elif error is None and s.status.current:
                s.status.current = False
            else:
                continue
            s.updated_at = utcnow()
            ops.append(Objects.put(s))
        if ops:
            await self.ctx.store.commit(ops)
        if error is not None:
            await self.tasks.finish(task, error=error)
            return
        if not answer.get("with_memory") and snap.status.with_memory:
            answer["note"] = (
                "the vm was stopped: its disks are back; it boots afresh at the next start "
                "(roll back while it runs to resume from the snapshot's memory)"
            )
        await self.tasks.finish(task, result={"snapshot": snap.spec.snapshot, **answer})

    async def delete(self, vm_name: str, snapshot: str, meta: RequestMeta) -> SnapshotAccepted:
        vm = await self.ctx.objects.get(Vm, vm_name)
        node = await self._host(vm)
        snap = await self.get(vm_name, snapshot)
        if snap.status.state in ("creating", "rolling-back"):
            raise Conflict(f"snapshot {snapshot!r} is {snap.status.state}; wait until it is done")
        snap.status.state = "deleting"
        snap.updated_at = utcnow()
        task = new_task(
            self.ctx, meta, "snapshot-delete", vm_name, {"snapshot": snapshot, "vm_id": vm.id}
        )
        rev = await self.ctx.store.commit(
            [Objects.put(snap), Objects.put(task)], [Objects.expect_unchanged(snap)]
        )
        snap.mod_revision = task.mod_revision = rev
        op = {"op": "snapshot-delete", "vm": vm_name, "tag": snapshot}
        inline = self._go(self._delete(node, snap, task, op))
        if inline is not None:
            await inline
            task = await self.ctx.objects.get(Task, task.id)
        return SnapshotAccepted(snap, task)

    async def _delete(self, node: Node, snap: VmSnapshot, task: Task, op: dict[str, Any]) -> None:
        task = await self.tasks.step(task, 1, f"deleting on host {node.name}")
        try:
            answer = await call_host_vms(node, op)
        except CorralError as exc:
            mine = await self.ctx.objects.find(VmSnapshot, snap.name)
            if mine is not None:
                mine.status.state = "ready"
                mine.status.message = f"delete failed: {exc.detail}"
                await self.ctx.store.commit([Objects.put(mine)])
            await self.tasks.finish(task, error=exc.detail)
            return
        siblings, _rev = await self.list(snap.spec.vm)
        mine = next((s for s in siblings if s.name == snap.name), snap)
        ops: list[Put | Delete] = [Objects.delete(VmSnapshot, snap.name)]
        # Its children hang from its parent now; the VM's disks derive from the parent too.
        for s in siblings:
            if s.name == snap.name:
                continue
            changed = False
            if s.status.parent == snap.spec.snapshot:
                s.status.parent = mine.status.parent
                changed = True
            if mine.status.current and s.spec.snapshot == mine.status.parent:
                s.status.current = True
                changed = True
            if changed:
                s.updated_at = utcnow()
                ops.append(Objects.put(s))
        await self.ctx.store.commit(ops)
        await self.tasks.finish(task, result={"snapshot": snap.spec.snapshot, **answer})

    async def forget_vm(self, vm: Vm) -> builtins.list[Delete]:
        """Deletes of the records of ``vm``'s snapshots (its disks go elsewhere)."""
        page = await self.ctx.objects.list(VmSnapshot, limit=1000, cursor=None)
        return [
            Objects.delete(VmSnapshot, s.name)
            for s in page.items
            if s.spec.vm == vm.name and s.status.vm_id == vm.id
        ]
